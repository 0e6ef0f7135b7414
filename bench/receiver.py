"""Benchmark: the receiver's durable SMTP intake against Postfix's smtp-sink (which stores
nothing), both fed by Postfix's smtp-source on loopback, in the same run.

    python bench/receiver.py [--messages N] [--sessions 20] [--size 5120] [--reuse]

Needs smtp-source and smtp-sink (Debian: `apt-get install postfix`, they are in /usr/sbin);
exits 2 saying so when one is missing. Steps:
1. smtp-sink on a free loopback port (as `nobody` when we are root); smtp-source -s 20
   -l 5120 -m N; wall time -> messages/s (the reference).
2. A temporary connectd tree (spool on the same filesystem as the temp dir, which the run
   prints), `connectd run receiver` as a real child process (a direct launcher of the class
   while the daemon is not registered), the same smtp-source run against it.
3. After the receiver stopped: every message smtp-source had answered 250 must be stored.
   smtp-source aborts on any reply but 2xx, so a completed run means N acknowledgements:
   there must be N files in new/ and N mail.received records, each naming a file whose size
   and sha256 match.

Without --reuse every message comes over its own connection (smtp-source's default, what the
issue's figure uses); --reuse keeps sessions open (-d); --processes N runs the receiver
with N worker processes (receiver.processes). Target (issue 5): ratio >= 0.2. Prints the
figures (with the receiver's CPU: % of one core, and CPU ms a message), then one line of JSON.

Noise on this kind of machine: the root filesystem (ext4 without a journal) makes every file
creation skip, one by one, the inodes of its group deleted in the last minute or more; a run
right after another (whose temporary tree was just removed) or after a test suite spends up
to a quarter of the receiver's CPU there (perf: recently_deleted under openat). Leave a
minute or two between runs, or check the CPU ms a message.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from conftest import write_config  # noqa: E402

from connectd import settings as settings_mod  # noqa: E402
from connectd.secrets import create_secrets  # noqa: E402
from connectd.spool import Spool, inbound_store  # noqa: E402

TARGET_RATIO = 0.2
RCPT = "reply@reply.localhost"
_LAUNCH = ("import sys\n"
           "from connectd import log, settings\n"
           "from connectd.daemons.receiver import Receiver\n"
           "s = settings.load(sys.argv[1])\n"
           "log.configure(s.log.level, 'json')\n"
           "sys.exit(Receiver(s, processes=int(sys.argv[2])).run())\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tool(name: str) -> str | None:
    return shutil.which(name) or next((str(p) for p in (Path("/usr/sbin") / name,) if p.exists()), None)


def wait_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                if s.recv(64).startswith(b"220"):
                    return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing answered on port {port}")


def source(port: int, messages: int, sessions: int, size: int, reuse: bool) -> float:
    """Run smtp-source against the port; returns its wall time (it exits non-zero, and so do
    we, if any reply was not positive)."""
    cmd = [tool("smtp-source") or "smtp-source", "-s", str(sessions), "-l", str(size),
           "-m", str(messages), "-f", "bench@example.com", "-t", RCPT]
    if reuse:
        cmd.append("-d")
    start = time.perf_counter()
    done = subprocess.run([*cmd, f"127.0.0.1:{port}"], capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"smtp-source failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return elapsed


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by `pid` and every live descendant."""
    tick = os.sysconf("SC_CLK_TCK")
    stats: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # after "(comm)": state ppid ... utime (index 11) stime (12)
        stats[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += stats.get(p, (0, 0.0))[1]
        todo.extend(c for c, (ppid, _) in stats.items() if ppid == p)
    return total


def run_sink(messages: int, sessions: int, size: int, reuse: bool) -> dict[str, Any]:
    port = free_port()
    cmd = [tool("smtp-sink") or "smtp-sink"]
    if os.geteuid() == 0:
        cmd += ["-u", "nobody"]  # smtp-sink refuses to run as root without it
    proc = subprocess.Popen([*cmd, f"127.0.0.1:{port}", "256"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_port(port, proc)
        source(port, min(messages, 1000), sessions, size, reuse)  # warm-up
        elapsed = source(port, messages, sessions, size, reuse)
    finally:
        proc.terminate()
        proc.wait(10)
    return {"messages": messages, "seconds": round(elapsed, 3), "msgs_per_s": round(messages / elapsed, 1)}


def prepare_tree(root: Path) -> tuple[Path, settings_mod.Settings]:
    cfg = write_config(root, extra=f"[receiver]\nport = {free_port()}\n[log]\nlevel = \"info\"\n")
    settings = settings_mod.load(cfg, environ={})
    create_secrets(settings.paths.secrets)
    return cfg, settings


def start_receiver(cfg: Path, logfile: Path, processes: int | None = None) -> subprocess.Popen:
    """`connectd run receiver`; with `processes` (receiver.processes, while settings.py has no
    such key) a direct launcher of the class."""
    from connectd.daemons import DAEMONS

    if "receiver" in DAEMONS and processes is None:
        cmd = [sys.executable, "-m", "connectd", "--config", str(cfg), "run", "receiver"]
    else:
        cmd = [sys.executable, "-c", _LAUNCH, str(cfg), str(processes or 1)]
    env = {k: v for k, v in os.environ.items() if k not in ("CONNECTD_CONFIG", "NOTIFY_SOCKET")}
    with open(logfile, "ab") as log:
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=log)


def verify(settings: settings_mod.Settings) -> dict[str, int]:
    """Files in new/, records, and how many records name a file whose bytes match."""
    store = inbound_store(settings)
    names = set(store.names())
    recs = []
    with Spool(settings.paths.spool).reader("receiver.events") as rd:
        for _, rec, _raw in rd.records():
            if rec is not None and rec.get("type") == "mail.received":
                recs.append(rec)
    matching = 0
    for rec in recs:
        try:
            data = store.read(rec["message"])
        except FileNotFoundError:
            continue
        if len(data) == rec["size"] and hashlib.sha256(data).hexdigest() == rec["sha256"]:
            matching += 1
    named = {r["message"] for r in recs}
    return {"files": len(names), "records": len(recs), "matching": matching,
            "files_without_record": len(names - named), "distinct_records": len(named)}


def run_receiver(root: Path, messages: int, sessions: int, size: int,
                 reuse: bool, processes: int | None = None) -> dict[str, Any]:
    cfg, settings = prepare_tree(root)
    proc = start_receiver(cfg, root / "receiver.log", processes)
    try:
        wait_port(settings.receiver.port, proc)
        warm = min(messages, 1000)
        source(settings.receiver.port, warm, sessions, size, reuse)
        cpu_before = tree_cpu(proc.pid)
        elapsed = source(settings.receiver.port, messages, sessions, size, reuse)
        # CPU% of the receiver (all its processes) during the measured run: ~100 per busy core
        cpu_s = tree_cpu(proc.pid) - cpu_before
    finally:
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(30)
    check = verify(settings)
    acked = warm + messages  # smtp-source stops at the first reply that is not 2xx
    lost = acked - check["matching"]
    return {"messages": messages, "seconds": round(elapsed, 3),
            "msgs_per_s": round(messages / elapsed, 1), "cpu_percent": round(cpu_s / elapsed * 100),
            "cpu_ms_per_msg": round(cpu_s / messages * 1000, 3),
            "acknowledged": acked, **check,
            "lost": lost, "exit_status": status}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=5000, help="messages per measured run")
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--size", type=int, default=5120, help="message payload bytes")
    ap.add_argument("--reuse", action="store_true", help="keep sessions open (smtp-source -d)")
    ap.add_argument("--processes", type=int, default=None,
                    help="receiver worker processes (receiver.processes; default: the config's)")
    args = ap.parse_args()
    missing = [n for n in ("smtp-source", "smtp-sink") if tool(n) is None]
    if missing:
        print(f"bench/receiver.py needs {' and '.join(missing)}: apt-get install postfix",
              file=sys.stderr)
        sys.exit(2)
    os.environ.pop("CONNECTD_CONFIG", None)
    load = os.getloadavg()[0]
    if load > 1.0:
        print(f"warning: load average {load:.1f} before the start: other processes share the "
              "cores, the figures will be noisy", flush=True)
    with tempfile.TemporaryDirectory(prefix="connectd-bench-receiver-") as tmp:
        fs = subprocess.run(["df", "--output=source,fstype", tmp], capture_output=True,
                            text=True).stdout.split("\n")[1].split()
        print(f"receiver vs smtp-sink: smtp-source -s {args.sessions} -l {args.size} "
              f"-m {args.messages}{' -d' if args.reuse else ''}, {os.cpu_count()} cores, "
              f"spool on {' '.join(fs)}", flush=True)
        sink = run_sink(args.messages, args.sessions, args.size, args.reuse)
        print(f"smtp-sink (stores nothing)   {sink['msgs_per_s']:>9,.0f} msgs/s", flush=True)
        ours = run_receiver(Path(tmp), args.messages, args.sessions, args.size, args.reuse,
                            args.processes)
    ratio = ours["msgs_per_s"] / sink["msgs_per_s"]
    print(f"receiver (fsynced, recorded) {ours['msgs_per_s']:>9,.0f} msgs/s   "
          f"receiver CPU {ours['cpu_percent']}%, {ours['cpu_ms_per_msg']} ms a message", flush=True)
    print(f"ratio {ratio:.3f} (target >= {TARGET_RATIO})   acknowledged {ours['acknowledged']:,}  "
          f"stored {ours['files']:,}  records {ours['records']:,}  lost {ours['lost']}", flush=True)
    result = {"bench": "receiver", "loadavg_before": round(load, 2), "reuse": args.reuse,
              "sessions": args.sessions, "size": args.size, "processes": args.processes,
              "smtp_sink": sink, "receiver": ours,
              "ratio": round(ratio, 3),
              "target_met": ratio >= TARGET_RATIO and ours["lost"] == 0
              and ours["files_without_record"] == 0}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
