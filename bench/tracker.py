"""Benchmark: the tracker's click redirects against nginx returning a static 302, with wrk, on
loopback, in the same run.

    python bench/tracker.py [--duration S] [--connections 64] [--processes N] [--tokens N]

Needs `wrk` and `nginx` (Debian: `apt-get install wrk nginx-light`); exits 2 saying so when
one is missing. Steps:
1. nginx on a free loopback port with its own temporary prefix and config (not the system's),
   as a foreground child, answering every request with a static 302; wrk -c 64 --latency.
2. A temporary connectd tree (SQLite customer DB with customers and links, secrets,
   durability "group"), `connectd run tracker` as a real child process, and wrk with a Lua
   script that sends GET /c/<token> round the token file (valid click tokens for different
   customers and links, a browser User-Agent).
3. After the tracker stopped: the link.clicked records in its streams (tracker.events.*) are
   counted and must be at least wrk's completed requests (no answered hit lost; a few more
   is fine: requests answered as wrk stopped reading are not in wrk's count).

Targets (issue 4): tracker requests/s >= 30% of nginx's; tracker p99 < 20 ms. Prints the
figures, then one line of JSON.

`prepare_tree(...)` and `run_tracker_load(...)` are importable (bench/profiler_lag.py runs a
profiler on the tree while this load runs).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from connectd import log  # noqa: E402
from connectd import settings as settings_mod  # noqa: E402

UA = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
      "Chrome/124.0.0.0 Safari/537.36")
TARGET_RATIO = 0.30
TARGET_P99_MS = 20.0
WARMUP = 2.0  # seconds of load before each measured run

_LUA = """
local tokens = {}
for line in io.lines("%(tokens)s") do tokens[#tokens + 1] = line end
local counter = 0
wrk.headers["User-Agent"] = "%(ua)s"
function setup(thread)
  thread:set("offset", counter * 7919)
  counter = counter + 1
end
local i = 0
function request()
  i = i + 1
  local k = (offset + i) %% #tokens + 1
  return wrk.format("GET", "/c/" .. tokens[k])
end
"""

_NGINX = """
worker_processes auto;
daemon off;
pid %(prefix)s/nginx.pid;
error_log %(prefix)s/error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path %(prefix)s/body;
  proxy_temp_path %(prefix)s/proxy;
  fastcgi_temp_path %(prefix)s/fastcgi;
  uwsgi_temp_path %(prefix)s/uwsgi;
  scgi_temp_path %(prefix)s/scgi;
  server {
    listen 127.0.0.1:%(port)d;
    location / {
      add_header Cache-Control no-store;
      return 302 https://shop.example/landing/page?utm_source=mail;
    }
  }
}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def missing_tools() -> list[str]:
    return [t for t in ("wrk", "nginx") if shutil.which(t) is None and
            not Path(f"/usr/sbin/{t}").exists()]


def _tool(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s")


# -- wrk ------------------------------------------------------------------------------------

def parse_wrk(out: str) -> dict[str, Any]:
    """wrk's text report -> requests, requests/s, p50/p99 ms, errors."""
    def ms(text: str) -> float:
        value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]

    res: dict[str, Any] = {
        "requests": int(re.search(r"(\d+) requests in", out).group(1)),  # type: ignore[union-attr]
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
    }
    for pct in ("50", "99"):
        m = re.search(rf"^\s+{pct}%\s+(\S+)", out, re.M)
        res[f"p{pct}_ms"] = round(ms(m.group(1)), 2) if m else None
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    res["non_2xx_3xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    res["socket_errors"] = sum(int(x) for x in m.groups()) if m else 0
    return res


def run_wrk(url: str, duration: float, connections: int, threads: int = 2,
            script: Path | None = None) -> dict[str, Any]:
    cmd = [_tool("wrk"), f"-t{threads}", f"-c{connections}", f"-d{duration:g}s", "--latency",
           "--timeout", "5s"]
    if script:
        cmd += ["-s", str(script)]
    out = subprocess.run(cmd + [url], capture_output=True, text=True, check=True).stdout
    return parse_wrk(out)


# -- nginx ----------------------------------------------------------------------------------

def write_script(path: Path, tokens: Path) -> Path:
    """The wrk Lua script sending GET /c/<token> round the token file."""
    path.write_text(_LUA % {"tokens": tokens, "ua": UA})
    return path


def settle() -> None:
    """Let the disk go quiet before a measurement: the set-up's writes (databases, deleted
    trees) otherwise reach the journal while the load runs, and one ext4 journal commit that
    an append waits for shows up as a 100+ ms outlier in the p99 of the next run."""
    os.sync()
    time.sleep(1.0)


def run_nginx_load(duration: float, connections: int, tokens: Path) -> dict[str, Any]:
    """nginx (own prefix and config, foreground child) returning a static 302, under wrk with
    the same Lua script as the tracker's run (the client does the same work for both)."""
    with tempfile.TemporaryDirectory(prefix="connectd-bench-nginx-") as prefix:
        script = write_script(Path(prefix) / "clicks.lua", tokens)
        port = free_port()
        conf = Path(prefix) / "nginx.conf"
        conf.write_text(_NGINX % {"prefix": prefix, "port": port})
        os.chmod(prefix, 0o755)  # workers drop to nobody when we are root
        proc = subprocess.Popen([_tool("nginx"), "-p", prefix, "-c", str(conf)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_port(port)
            run_wrk(f"http://127.0.0.1:{port}/", WARMUP, connections, script=script)
            settle()
            return run_wrk(f"http://127.0.0.1:{port}/", duration, connections, script=script)
        finally:
            proc.send_signal(signal.SIGQUIT)  # graceful: workers finish, the master exits
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# -- the tracker ----------------------------------------------------------------------------

@dataclass
class Tree:
    """A temporary connectd installation for the tracker benchmark."""

    root: Path
    config: Path
    settings: settings_mod.Settings
    port: int
    tokens: Path  # one click token per line
    token_count: int


def prepare_tree(root: Path, customers: int = 10_000, links: int = 200, tokens: int = 20_000,
                 processes: int = 0, durability: str = "group", extra: str = "") -> Tree:
    """Settings, migrated SQLite databases, secrets, customers, a message with `links` links,
    and `tokens` valid click tokens for random (customer, link) pairs in a file."""
    from conftest import seed_outbound, write_config
    from sqlalchemy import text

    from connectd.core.tokens import sign_token
    from connectd.db.engine import make_engine
    from connectd.init import initialize
    from connectd.secrets import load_secrets

    port = free_port()
    cfg = write_config(root, extra=(f'[spool]\ndurability = "{durability}"\n'
                                    f'[tracker]\nport = {port}\nprocesses = {processes}\n'
                                    '[log]\nlevel = "warning"\n' + extra))
    st = settings_mod.load(cfg, environ={})
    initialize(st)
    ids = seed_outbound(st.database.customer_url, customers)
    engine = make_engine(st.database.customer_url)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO links (id, message_id, url, labels) "
                          "VALUES (:i, :m, :u, '[]')"),
                     [{"i": i, "m": ids["message"],
                       "u": f"https://shop.example/product/{i}?utm_source=mail&utm_campaign=spring"}
                      for i in range(1, links + 1)])
    engine.dispose()
    key = load_secrets(st.paths.secrets).token_keys[0]
    rnd = random.Random(4)
    path = root / "tokens.txt"
    path.write_text("".join(
        sign_token(key, ids["instance"], rnd.randint(1, customers), rnd.randint(1, links),
                   kind="c") + "\n" for _ in range(tokens)))
    return Tree(root, cfg, st, port, path, tokens)


def count_clicks(settings: settings_mod.Settings) -> int:
    """link.clicked records in every tracker stream of the tree's spool."""
    from connectd.spool import Spool

    spool = Spool(settings.paths.spool, settings.spool)
    total = 0
    for name in spool.streams():
        if not name.startswith("tracker.events."):
            continue
        with spool.reader(name) as reader:
            while (batch := reader.read(100_000)) is not None:
                total += batch.raw.count(b'"type":"link.clicked"')
    return total


def start_tracker(tree: Tree) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "CONNECTD_CONFIG")}
    proc = subprocess.Popen([sys.executable, "-m", "connectd", "--config", str(tree.config),
                             "run", "tracker"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{tree.port}/healthz", timeout=1):
                return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("tracker did not start: " +
                                   proc.stderr.read().decode(errors="replace")[-2000:]) from None
            time.sleep(0.05)


def stop_tracker(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_tracker_load(tree: Tree, duration: float = 10.0, connections: int = 64,
                     threads: int = 2, while_running: Callable[[], Any] | None = None
                     ) -> dict[str, Any]:
    """Start `connectd run tracker` on `tree`, warm up, run wrk with the tree's click tokens
    for `duration` seconds, stop the tracker, and return wrk's figures plus the link.clicked
    records found in the streams (`recorded`, `lost` = answered but not recorded, >= 0)."""
    script = write_script(tree.root / "clicks.lua", tree.tokens)
    before = count_clicks(tree.settings)
    proc = start_tracker(tree)
    try:
        warm = run_wrk(f"http://127.0.0.1:{tree.port}/", WARMUP, connections, threads, script)
        settle()
        if while_running is not None:
            while_running()
        res = run_wrk(f"http://127.0.0.1:{tree.port}/", duration, connections, threads, script)
    finally:
        stop_tracker(proc)
    recorded = count_clicks(tree.settings) - before
    answered = warm["requests"] + res["requests"]
    res.update(answered_total=answered, recorded=recorded, lost=max(0, answered - recorded))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run")
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--processes", type=int, default=0, help="tracker workers (0: one per core)")
    ap.add_argument("--tokens", type=int, default=20_000, help="distinct click tokens")
    args = ap.parse_args()
    missing = missing_tools()
    if missing:
        print(f"bench/tracker.py needs {' and '.join(missing)}: "
              "apt-get install wrk nginx-light", file=sys.stderr)
        sys.exit(2)
    log.configure("warning", "console")
    os.environ.pop("CONNECTD_CONFIG", None)
    load = os.getloadavg()[0]
    if load > 1.0:
        print(f"warning: load average {load:.1f} before the start: other processes share the "
              "cores, the figures (p99 above all) will be noisy", flush=True)
    print(f"tracker vs nginx: wrk -c{args.connections} --latency, {args.duration:g} s each, "
          f"{os.cpu_count()} cores (wrk shares them)", flush=True)
    with tempfile.TemporaryDirectory(prefix="connectd-bench-tracker-") as tmp:
        tree = prepare_tree(Path(tmp), tokens=args.tokens, processes=args.processes)
        nginx = run_nginx_load(args.duration, args.connections, tree.tokens)
        print(f"nginx   static 302  {nginx['rps']:>10,.0f} req/s  p50 {nginx['p50_ms']} ms  "
              f"p99 {nginx['p99_ms']} ms", flush=True)
        ours = run_tracker_load(tree, args.duration, args.connections)
    ratio = ours["rps"] / nginx["rps"]
    print(f"tracker click 302   {ours['rps']:>10,.0f} req/s  p50 {ours['p50_ms']} ms  "
          f"p99 {ours['p99_ms']} ms  (durability group)", flush=True)
    print(f"ratio {ratio:.2f} (target >= {TARGET_RATIO})   p99 {ours['p99_ms']} ms "
          f"(target < {TARGET_P99_MS})", flush=True)
    print(f"answered {ours['answered_total']:,}  recorded {ours['recorded']:,}  "
          f"lost {ours['lost']}  non-3xx {ours['non_2xx_3xx']}  socket errors "
          f"{ours['socket_errors']}", flush=True)
    result = {"bench": "tracker", "loadavg_before": round(load, 2), "nginx": nginx, "tracker": ours, "ratio": round(ratio, 3),
              "target_met": ratio >= TARGET_RATIO and (ours["p99_ms"] or 1e9) < TARGET_P99_MS
              and ours["lost"] == 0 and ours["non_2xx_3xx"] == 0}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
