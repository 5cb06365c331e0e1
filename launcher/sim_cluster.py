"""A small multi-node Slurm cluster on this machine: each "node" is its own network namespace, for multi-node tests.

    python -m launcher.sim_cluster start [--nodes 3]   # build it; prints the SLURM_CONF to export
    python -m launcher.sim_cluster stop                 # remove everything it made

Layout: a bridge ``<prefix>br`` holding ``<subnet>.1`` in the root namespace (where
slurmctld and munged run), and per node ``<prefix>-nodeK``: a veth pair (``<prefix>vK`` on the bridge, ``eth0``
inside, address ``<subnet>.(K+1)``), its own hostname (a UTS namespace) and a hosts file naming every node (bind-
mounted over /etc/hosts in a private mount namespace), one slurmd. Jobs started by a slurmd inherit all three, so a
task on ``node2`` sees hostname ``node2``, resolves ``node1`` through the hosts file and reaches it only over the
bridge (gloo: ``GLOO_SOCKET_IFNAME=eth0``). The shared file system is this machine's. Slurm runs from its own
``slurm.conf`` (ports 6917/6918, state and logs under the cluster's folder): a single-node local Slurm
(launcher.local_slurm) may run beside it. Only the namespaces, links and daemons this object made are touched;
``stop`` removes them, also after a failed test, and a leftover of a crashed run with the same prefix is removed
before a start.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from launcher.local_slurm import MUNGE_PID, SlurmUnavailable, install, start_munge

SLURMCTLD_PORT, SLURMD_PORT = 6917, 6918


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and result.returncode:
        raise SlurmUnavailable(f"{' '.join(cmd)} failed: {result.stderr.strip()[-500:]}")
    return result


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


@dataclass
class SimCluster:
    """``nodes`` slurmd "nodes" in network namespaces, ``cpus`` CPUs each (config_overrides: more than the real)."""

    root: Path
    nodes: int = 3
    cpus: int = 4
    prefix: str = "ualmsim"
    subnet: str = "10.77.0"
    slurmd_timeout: int = 10  # seconds without a slurmd answer before its node is DOWN (Slurm default: 300)
    node_names: list[str] = field(init=False)
    _munge_started: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.node_names = [f"node{k}" for k in range(1, self.nodes + 1)]

    # --- names ----------------------------------------------------------------------------------------------
    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """What a client (sbatch, squeue, scontrol) needs to talk to this cluster."""
        return {"SLURM_CONF": str(self.conf)}

    @property
    def bridge(self) -> str:
        return f"{self.prefix}br"

    @property
    def controller_addr(self) -> str:
        return f"{self.subnet}.1"

    def netns(self, node: str) -> str:
        return f"{self.prefix}-{node}"

    def addr(self, node: str) -> str:
        return f"{self.subnet}.{self.node_names.index(node) + 2}"

    def _veth(self, node: str) -> str:
        return f"{self.prefix}v{self.node_names.index(node) + 1}"

    def _hosts_text(self) -> str:
        lines = ["127.0.0.1 localhost", f"{self.controller_addr} {self.prefix}ctl"]
        return "\n".join(lines + [f"{self.addr(n)} {n}" for n in self.node_names]) + "\n"

    def _slurm_conf(self) -> str:
        r = self.root
        nodes = "\n".join(f"NodeName={n} NodeAddr={self.addr(n)} CPUs={self.cpus} RealMemory=8000 State=UNKNOWN"
                          for n in self.node_names)
        return f"""\
# Written by ualm_nemo launcher/sim_cluster.py: {self.nodes} nodes in network namespaces (tests only).
ClusterName={self.prefix}
SlurmctldHost={self.prefix}ctl({self.controller_addr})
SlurmctldPort={SLURMCTLD_PORT}
SlurmdPort={SLURMD_PORT}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
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
SlurmdTimeout={self.slurmd_timeout}
MinJobAge=300
KillWait=5
MailProg=/bin/true
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
{nodes}
PartitionName=sim Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""

    def _isolated(self, hostname: str, *cmd: str) -> list[str]:
        """``cmd`` with its own hostname and the cluster's hosts file (private UTS and mount namespaces)."""
        script = f'mount --bind "$1" /etc/hosts && hostname "$2" && shift 2 && exec "$@"'
        return ["unshare", "--mount", "--uts", "--propagation", "private", "sh", "-c", script, "sh",
                str(self.root / "hosts"), hostname, *cmd]

    # --- life cycle -----------------------------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> "SimCluster":
        if os.geteuid() != 0:
            raise SlurmUnavailable("network namespaces need root")
        for tool in ("ip", "unshare", "nsenter"):
            if shutil.which(tool) is None:
                raise SlurmUnavailable(f"{tool} is not installed")
        install()
        self.stop()  # a leftover of a crashed run with this prefix
        try:
            self._network()
            self._daemons(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _network(self) -> None:
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        _run("ip", "addr", "add", f"{self.controller_addr}/24", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")
        for node in self.node_names:
            ns, veth = self.netns(node), self._veth(node)
            _run("ip", "netns", "add", ns)
            _run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _run("ip", "link", "set", veth, "master", self.bridge, "up")
            _run("ip", "netns", "exec", ns, "ip", "addr", "add", f"{self.addr(node)}/24", "dev", "eth0")
            _run("ip", "netns", "exec", ns, "ip", "link", "set", "eth0", "up")
            _run("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")

    def _daemons(self, timeout: float) -> None:
        for sub in ("state", "log", "spool"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        (self.root / "hosts").write_text(self._hosts_text())
        self.conf.write_text(self._slurm_conf())
        self._munge_started = start_munge()
        subprocess.run(self._isolated(f"{self.prefix}ctl", "slurmctld", "-f", str(self.conf)), check=True,
                       capture_output=True, timeout=30)
        for node in self.node_names:
            # nsenter, not `ip netns exec`: that remounts /sys, where slurmd needs the cgroup file system
            subprocess.run(["nsenter", f"--net=/run/netns/{self.netns(node)}",
                            *self._isolated(node, "slurmd", "-f", str(self.conf), "-N", node)],
                           check=True, capture_output=True, timeout=30)
        deadline = time.monotonic() + timeout
        while self.idle_nodes() != set(self.node_names):
            if time.monotonic() > deadline:
                raise SlurmUnavailable(f"nodes not idle after {timeout:.0f} s: {self.node_states()}; see "
                                       f"{self.root}/log/")
            time.sleep(0.3)

    def stop(self) -> None:
        """Kill every process in the cluster's namespaces and its daemons; remove namespaces, links, bridge."""
        for node in self.node_names:
            self._kill_pids(self.node_pids(node))
        for pidfile in [self.root / "slurmctld.pid"]:
            self._kill_pids(self._pidfile(pidfile))
        for node in self.node_names:
            _run("ip", "netns", "delete", self.netns(node), check=False)
            _run("ip", "link", "delete", self._veth(node), check=False)
        _run("ip", "link", "delete", self.bridge, check=False)
        if self._munge_started:
            self._kill_pids(self._pidfile(MUNGE_PID))
            self._munge_started = False

    def __enter__(self) -> "SimCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- inspection and faults ------------------------------------------------------------------------------
    def slurm(self, *cmd: str, check: bool = True) -> str:
        """A Slurm client command against this cluster; its stdout."""
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=30, env={**os.environ, **self.env})
        if check and result.returncode:
            raise RuntimeError(f"{' '.join(cmd)}: {result.stderr.strip()}")
        return result.stdout

    def node_states(self) -> dict[str, str]:
        out = self.slurm("sinfo", "-h", "-N", "-o", "%N %T", check=False)
        return {name: state.rstrip("*~#") for name, state in (line.split() for line in out.splitlines())}

    def idle_nodes(self) -> set[str]:
        return {n for n, s in self.node_states().items() if s == "idle"}

    def node_pids(self, node: str) -> list[int]:
        """Every process whose network namespace is the node's (its slurmd, steps and tasks)."""
        if not Path(f"/run/netns/{self.netns(node)}").exists():
            return []
        out = _run("ip", "netns", "pids", self.netns(node), check=False).stdout
        return [int(p) for p in out.split()]

    def lose_node(self, node: str) -> None:
        """A node lost: its link goes down, its slurmd and every process on it are killed (SIGKILL)."""
        _run("ip", "link", "set", self._veth(node), "down")
        self._kill_pids(self.node_pids(node))

    def restore_node(self, node: str) -> None:
        """The node comes back (link up, slurmd restarted); ReturnToService=2 makes it usable again."""
        _run("ip", "link", "set", self._veth(node), "up")
        subprocess.run(["nsenter", f"--net=/run/netns/{self.netns(node)}",
                        *self._isolated(node, "slurmd", "-f", str(self.conf), "-N", node)],
                       check=True, capture_output=True, timeout=30)

    @staticmethod
    def _pidfile(path: Path) -> list[int]:
        try:
            return [int(path.read_text().split()[0])]
        except (OSError, ValueError, IndexError):
            return []

    @staticmethod
    def _kill_pids(pids: list[int], wait: float = 10.0) -> None:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        deadline = time.monotonic() + wait
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launcher.sim_cluster", description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=("start", "stop"))
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--root", default="/tmp/ualm_sim_cluster", help="its slurm.conf, state and logs")
    args = p.parse_args(argv)
    cluster = SimCluster(Path(args.root), nodes=args.nodes)
    if args.action == "stop":
        cluster.stop()
        print("stopped")
        return 0
    try:
        cluster.start()
    except SlurmUnavailable as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{args.nodes} nodes up: export SLURM_CONF={cluster.conf}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
