"""A real single-node Slurm on this machine, for the launcher's tests and for trying the launcher out.

    python -m launcher.local_slurm start   # install (apt, root only) if missing, configure, start; idempotent
    python -m launcher.local_slurm stop    # stop only the daemons a `start` of this machine's session started

Facts this relies on: Debian's slurmctld/slurmd/munge 22.05, no systemd
(daemons started by hand), ``slurmd -N localhost`` because the host name is not ``localhost``, loopback-only
ports. A daemon already running is reused and never stopped; ``stop`` ends only PIDs recorded by ``start``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

CONF = Path("/etc/slurm/slurm.conf")
STARTED = Path("/run/ualm_local_slurm.json")  # PIDs this helper started (what `stop` may end)
MUNGE_PID = Path("/run/munge/munged.pid")
PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]

SLURM_CONF = """\
# Written by ualm_nemo launcher/local_slurm.py: a single-node Slurm for tests.
ClusterName=local
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# a requeued job may start again after cred_expire seconds (default 120; short for tests)
AuthInfo=cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,bf_interval=1,sched_min_interval=0
DependencyParameters=kill_invalid_depend
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=300
KillWait=10
MailProg=/bin/true
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=localhost NodeAddr=127.0.0.1 CPUs=4 RealMemory=16000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


class SlurmUnavailable(RuntimeError):
    """Slurm cannot be installed or started here (not root, no apt-get, no packages)."""


def _ok(*cmd: str) -> bool:
    try:
        return subprocess.run(cmd, capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _pid_alive(pidfile: Path) -> int | None:
    try:
        pid = int(pidfile.read_text().split()[0])
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError, IndexError):
        return None


def node_ready() -> bool:
    """The controller answers and the node can take jobs."""
    if not _ok("scontrol", "ping"):
        return False
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, timeout=20).stdout
    return any(state.strip().rstrip("*") in ("idle", "mixed", "allocated", "completing") for state in out.split())


def install() -> None:
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SlurmUnavailable("Slurm is not installed and this is not a root Debian machine with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "--no-install-recommends",
                                               *PACKAGES]):
        result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        if result.returncode:
            raise SlurmUnavailable(f"{' '.join(cmd)} failed: {result.stderr[-2000:]}")


def start_munge() -> bool:
    """Start munged (the credential daemon every Slurm here shares) unless it runs; True when this call started it."""
    Path("/run/munge").mkdir(parents=True, exist_ok=True)
    shutil.chown("/run/munge", user="munge")
    if _pid_alive(MUNGE_PID) is not None:
        return False
    subprocess.run(["runuser", "-u", "munge", "--", "munged", "--force"], check=True, capture_output=True,
                   timeout=30)
    for _ in range(50):
        if _pid_alive(MUNGE_PID) is not None:
            return True
        time.sleep(0.1)
    raise SlurmUnavailable("munged did not start")


def start(timeout: float = 60.0) -> list[str]:
    """Install, configure and start what is missing; returns the daemons started by this call."""
    if shutil.which("scontrol") and node_ready():
        return []
    install()
    if not CONF.exists():
        CONF.parent.mkdir(parents=True, exist_ok=True)
        CONF.write_text(SLURM_CONF)
    for folder in ("/var/spool/slurmctld", "/var/spool/slurmd", "/var/log/slurm", "/run/munge"):
        Path(folder).mkdir(parents=True, exist_ok=True)
    shutil.chown("/run/munge", user="munge")
    started: dict[str, int] = json.loads(STARTED.read_text()) if STARTED.exists() else {}
    daemons = [("munged", MUNGE_PID, ["runuser", "-u", "munge", "--", "munged", "--force"]),
               ("slurmctld", Path("/run/slurmctld.pid"), ["slurmctld"]),
               ("slurmd", Path("/run/slurmd.pid"), ["slurmd", "-N", "localhost"])]
    now_started = []
    for name, pidfile, cmd in daemons:
        if _pid_alive(pidfile) is None:
            subprocess.run(cmd, check=True, capture_output=True, timeout=30)
            for _ in range(50):
                if (pid := _pid_alive(pidfile)) is not None:
                    break
                time.sleep(0.1)
            else:
                raise SlurmUnavailable(f"{name} did not start (see /var/log/slurm/)")
            started[name] = pid
            now_started.append(name)
    STARTED.write_text(json.dumps(started))
    deadline = time.monotonic() + timeout
    while not node_ready():
        if time.monotonic() > deadline:
            raise SlurmUnavailable("the local Slurm node did not become ready; see /var/log/slurm/")
        _ok("scontrol", "update", "nodename=localhost", "state=resume")
        time.sleep(0.5)
    return now_started


def stop(names: list[str] | None = None) -> list[str]:
    """Stop the daemons recorded by ``start`` (all, or only ``names``); others are left alone."""
    if not STARTED.exists():
        return []
    started: dict[str, int] = json.loads(STARTED.read_text())
    stopped = []
    for name in ("slurmd", "slurmctld", "munged"):  # reverse start order
        if name in started and (names is None or name in names):
            try:
                os.kill(started.pop(name), signal.SIGTERM)
                stopped.append(name)
            except ProcessLookupError:
                pass
    if started:
        STARTED.write_text(json.dumps(started))
    else:
        STARTED.unlink(missing_ok=True)
    return stopped


if __name__ == "__main__":
    action = sys.argv[1] if len(sys.argv) > 1 else "start"
    if action not in ("start", "stop"):
        sys.exit("usage: python -m launcher.local_slurm start|stop")
    print(f"{action}: {(start if action == 'start' else stop)() or 'nothing to do'}")
