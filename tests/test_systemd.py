"""The etc/ deployment examples: the systemd units pass `systemd-analyze verify` silently and
agree with the code (exit status 78, the daemons that exist); the cron lines run commands
the CLI has; every daemon runs under MemoryDenyWriteExecute. (etc/logrotate/connectd is exercised on a live log in test_supervisor.py.)"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from connectd import settings

UNITS = Path(__file__).resolve().parent.parent / "etc" / "systemd"
TEMPLATE = UNITS / "connectd@.service"
TARGET = UNITS / "connectd.target"
COMPOSERS = UNITS / "connectd-composer@.service"


def unit_keys(path: Path) -> dict[str, list[str]]:
    """'Section.Key' -> values in file order (units may repeat keys, so no configparser)."""
    keys: dict[str, list[str]] = {}
    section = ""
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        keys.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return keys


def connectd_executable() -> Path:
    """The connectd script installed next to this interpreter (the venv's)."""
    path = Path(sys.executable).parent / "connectd"
    if not path.exists():
        pytest.skip(f"no connectd script at {path} (pip install -e . first)")
    return path


def verify(unit_dir: Path, *units: str) -> tuple[int, list[str]]:
    """Run systemd-analyze verify on `units` found in `unit_dir`; return its status and the
    output lines that concern our units (the host's own units may have warnings of their own)."""
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed")
    help_text = subprocess.run([exe, "verify", "--help"], capture_output=True, text=True).stdout
    options = ["--man=no"]
    if "--recursive-errors" in help_text:
        options.append("--recursive-errors=no")  # do not judge the host's units we depend on
    # The unit path lists our directory first; the empty entry after ':' keeps the defaults
    # (for network-online.target and friends). A template is verified through an instance.
    env = {"SYSTEMD_UNIT_PATH": f"{unit_dir}:", "PATH": "/usr/bin:/bin", "SYSTEMD_LOG_LEVEL": "notice"}
    proc = subprocess.run([exe, "verify", *options, *(str(unit_dir / u) for u in units)],
                          capture_output=True, text=True, env=env, timeout=60)
    output = (proc.stdout + proc.stderr).splitlines()
    if proc.returncode != 0 and any("Failed to initialize manager" in line or
                                    "Operation not permitted" in line for line in output):
        pytest.skip(f"systemd-analyze cannot run here: {output[-1]}")
    ours = [line for line in output if re.search(r"connectd(@|\.target)|" + re.escape(str(unit_dir)), line)]
    return proc.returncode, ours


@pytest.fixture
def unit_dir(tmp_path: Path) -> Path:
    """Copies of our units, ExecStart pointed at this venv's connectd so it is executable."""
    exe = connectd_executable()
    text = TEMPLATE.read_text()
    assert "ExecStart=/usr/local/bin/connectd run %i" in text
    (tmp_path / TEMPLATE.name).write_text(text.replace("/usr/local/bin/connectd", str(exe)))
    shutil.copy(TARGET, tmp_path / TARGET.name)
    (tmp_path / COMPOSERS.name).write_text(
        COMPOSERS.read_text().replace("/usr/local/bin/connectd", str(exe)))
    return tmp_path


def test_units_verify_cleanly(unit_dir: Path) -> None:
    """systemd-analyze verify passes an instance of the template and the target, silently."""
    status, ours = verify(unit_dir, "connectd@profiler.service", "connectd.target")
    assert ours == []
    assert status == 0


def test_composer_template_verifies(unit_dir: Path) -> None:
    """connectd-composer@N.service verifies too, and runs `run composer --instance N`."""
    status, ours = verify(unit_dir, "connectd-composer@2.service")
    assert ours == []
    assert status == 0
    keys = unit_keys(COMPOSERS)
    assert keys["Service.ExecStart"] == ["/usr/local/bin/connectd run composer --instance %i"]
    # the same hardening and restart policy as every other daemon
    template = unit_keys(TEMPLATE)
    for key in ("Service.Type", "Service.RestartPreventExitStatus", "Service.WatchdogSec",
                "Service.MemoryDenyWriteExecute", "Service.SystemCallFilter", "Unit.PartOf"):
        assert keys[key] == template[key], key


def test_verify_would_catch_a_mistake(unit_dir: Path) -> None:
    """The check above can fail: a misspelt key in our template is reported."""
    template = unit_dir / TEMPLATE.name
    template.write_text(template.read_text().replace("NoNewPrivileges=", "NoNewPrivilege="))
    _, ours = verify(unit_dir, "connectd@profiler.service")
    assert any("NoNewPrivilege" in line for line in ours)


def test_template_matches_the_code() -> None:
    """Type=notify, no restart on EX_CONFIG, reload by HUP, one ExecStart per instance."""
    keys = unit_keys(TEMPLATE)
    assert keys["Service.Type"] == ["notify"]
    assert keys["Service.RestartPreventExitStatus"] == [str(settings.EX_CONFIG)]
    assert keys["Service.ExecStart"] == ["/usr/local/bin/connectd run %i"]
    assert keys["Service.ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert keys["Service.CapabilityBoundingSet"] == [""]
    assert keys["Unit.PartOf"] == ["connectd.target"]
    assert keys["Install.WantedBy"] == ["connectd.target"]


def test_target_wants_only_daemons_that_exist() -> None:
    """Every connectd@NAME the target pulls in names a daemon of this build."""
    from connectd import daemons

    available = getattr(daemons, "DAEMONS", None)
    if available is None:
        pytest.skip("connectd.daemons.DAEMONS does not exist yet in this build")
    wanted = " ".join(unit_keys(TARGET).get("Unit.Wants", [])).split()
    names = [re.fullmatch(r"connectd@(.+)\.service", unit).group(1) for unit in wanted]
    assert names, "connectd.target wants no daemon"
    assert set(names) <= set(available)


CRON = UNITS.parent / "cron" / "connectd"


def cron_jobs(text: str) -> list[list[str]]:
    """The active /etc/cron.d lines: [minute, hour, day, month, weekday, user, command...]."""
    jobs = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or re.match(r"^[A-Z_]+=", line):
            continue
        jobs.append(line.split())
    return jobs


def test_cron_example_runs_existing_commands() -> None:
    """Each active cron line has the cron.d shape and runs a `connectd` command that exists."""
    jobs = cron_jobs(CRON.read_text())
    assert jobs, "no active job in etc/cron/connectd"
    exe = connectd_executable()
    for job in jobs:
        assert len(job) >= 8 and job[5] == "connectd" and job[6] == "connectd", job
        args = job[7:]
        proc = subprocess.run([str(exe), *args, "--help"], capture_output=True, text=True, timeout=60)
        if "No such command" in proc.stderr:
            pytest.skip(f"`connectd {' '.join(args)}` is not in this build yet")
        assert proc.returncode == 0, proc.stderr


# Exec `argv` with the kernel's MDWE (Linux >= 6.3): no memory may become writable and
# executable, what MemoryDenyWriteExecute=yes enforces (systemd uses the same prctl or seccomp).
MDWE_EXEC = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
    sys.exit(99)
os.execv(sys.argv[1], sys.argv[1:])
"""


def test_daemons_run_under_memory_deny_write_execute(tmp_path: Path) -> None:
    """`connectd run NAME --once` works for every daemon with W+X memory refused."""
    from conftest import write_config

    from connectd import daemons

    available = getattr(daemons, "DAEMONS", None)
    if not available:
        pytest.skip("connectd.daemons.DAEMONS does not exist yet in this build")
    exe = connectd_executable()
    cfg = write_config(tmp_path)
    init = subprocess.run([str(exe), "--config", str(cfg), "init"], capture_output=True, text=True,
                          timeout=120)
    if init.returncode != 0:
        pytest.skip(f"`connectd init` is not usable yet: {init.stderr.strip()[-200:]}")
    probe = [sys.executable, "-c", MDWE_EXEC]
    check = subprocess.run([*probe, sys.executable, "-c",
                            "import mmap; mmap.mmap(-1, 4096, prot=7)"], capture_output=True)
    if check.returncode == 99:
        pytest.skip("this kernel has no PR_SET_MDWE (Linux < 6.3)")
    assert check.returncode != 0, "a W+X mapping was allowed: the probe does not work"
    for name in available:
        proc = subprocess.run([*probe, str(exe), "--config", str(cfg), "run", name, "--once"],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"{name}: {proc.stderr[-2000:]}"
