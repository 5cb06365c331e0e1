"""Where and how a stage runs on Slurm: a validated dataclass, loaded from a preset (conf/cluster/*.yaml) and flags.

Every check names the flag (or preset key) to change. Values that end up in ``#SBATCH`` lines are limited to what
sbatch's own directive parser can carry (no newlines; quotes and backslashes are escaped by ``launcher.sbatch``).
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from ualm_nemo.model.config import ConfigError

REPO = Path(__file__).resolve().parent.parent
PRESETS = REPO / "conf" / "cluster"
MODES = ("requeue", "chain")
# sbatch --time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S
_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SBATCH_ARG = re.compile(r"^--[a-z][a-z0-9-]*(=[^\n\r]*)?$")
# Lightning treats these job names as an interactive session and ignores SLURM_* (wrong world size)
_INTERACTIVE_NAMES = ("bash", "interactive")
# owned by the launcher: set through their own fields, never through sbatch_args
_OWNED = {"--job-name", "--nodes", "--ntasks-per-node", "--gpus-per-node", "--partition", "--account", "--time",
          "--signal", "--requeue", "--no-requeue", "--output", "--error", "--open-mode", "--chdir"}


@dataclass(kw_only=True)
class ClusterConfig:
    job_name: str = "ualm"
    nodes: int = 1
    gpus_per_node: int = 8  # 0: CPU tasks (tests, the local Slurm)
    tasks_per_node: int | None = None  # default: one task per GPU (1 when gpus_per_node=0)
    cpus_per_task: int | None = None
    mem: str | None = None  # e.g. "0" (all of the node) or "200G"
    partition: str | None = None
    account: str | None = None
    time: str = "04:00:00"
    signal_seconds: int = 120  # USR1 this long before the time limit: checkpoint, then requeue/chain
    mode: str = "requeue"  # requeue: scontrol requeue the same job id; chain: submit a dependent job
    max_restarts: int = 1000  # stop requeueing/chaining after this many jobs (a guard against loops)
    max_failures: int = 3  # restarts after a crash (dead or hung rank) in a row without a new checkpoint between
    container_image: str | None = None  # pyxis/enroot: srun --container-image
    container_mounts: list[str] = field(default_factory=list)  # "src:dst[:flags]"; src == dst keeps paths valid
    container_workdir: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    sbatch_args: list[str] = field(default_factory=list)  # extra directives, e.g. "--exclusive", "--qos=high"
    python: str | None = None  # default: this interpreter locally, `python` inside a container
    workdir: str = str(REPO)  # where examples/ and conf/ are (inside the container: its path there)

    @property
    def ntasks_per_node(self) -> int:
        if self.tasks_per_node is not None:
            return self.tasks_per_node
        return self.gpus_per_node or 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.ntasks_per_node

    @property
    def python_exe(self) -> str:
        if self.python:
            return self.python
        return "python" if self.container_image else sys.executable

    def time_seconds(self) -> int:
        match = _TIME.match(self.time)
        if not match:
            raise ConfigError(f"--time={self.time!r}: use M, M:S, H:M:S, D-H, D-H:M or D-H:M:S")
        days, *rest = match.groups()
        nums = [int(n) for n in rest if n is not None]
        if days is not None:  # D-H, D-H:M, D-H:M:S
            h, m, s = (nums + [0, 0])[:3]
            return int(days) * 86400 + h * 3600 + m * 60 + s
        if len(nums) == 3:  # H:M:S
            return nums[0] * 3600 + nums[1] * 60 + nums[2]
        return nums[0] * 60 + (nums[1] if len(nums) == 2 else 0)  # M or M:S

    def validate(self) -> "ClusterConfig":
        if self.nodes < 1:
            raise ConfigError(f"--nodes={self.nodes} must be >= 1")
        if self.gpus_per_node < 0:
            raise ConfigError(f"--gpus-per-node={self.gpus_per_node} must be >= 0")
        if self.ntasks_per_node < 1:
            raise ConfigError(f"--tasks-per-node={self.tasks_per_node} must be >= 1")
        if self.gpus_per_node and self.tasks_per_node not in (None, self.gpus_per_node):
            raise ConfigError(f"--tasks-per-node={self.tasks_per_node} must equal --gpus-per-node="
                              f"{self.gpus_per_node}: one task per GPU")
        if self.mode not in MODES:
            raise ConfigError(f"--mode={self.mode!r}: choose one of {MODES}")
        if self.max_restarts < 0:
            raise ConfigError("--max-restarts must be >= 0")
        if self.max_failures < 0:
            raise ConfigError("--max-failures must be >= 0 (0: a crash ends the job)")
        limit = self.time_seconds()
        if limit <= 0:
            raise ConfigError(f"--time={self.time!r} must be positive")
        if not 0 < self.signal_seconds < limit:
            raise ConfigError(f"--signal-seconds={self.signal_seconds} must lie between 0 and the time limit "
                              f"({limit} s): it is how long before the limit the job checkpoints")
        for flag, value in (("--job-name", self.job_name), ("--partition", self.partition),
                            ("--account", self.account), ("--mem", self.mem)):
            if value is not None and (not value or any(c in value for c in "\n\r\0")):
                raise ConfigError(f"{flag}={value!r}: must be non-empty and on one line")
        if self.job_name.strip() in _INTERACTIVE_NAMES:
            raise ConfigError(f"--job-name={self.job_name!r}: Lightning treats this name as an interactive "
                              "session and ignores SLURM_*; choose another name")
        for key, value in self.env.items():
            if not _ENV_KEY.match(key):
                raise ConfigError(f"--env {key!r}: variable names are letters, digits and _, not starting with a digit")
            if "\0" in value:
                raise ConfigError(f"--env {key}: the value contains a NUL byte")
        for arg in self.sbatch_args:
            if not _SBATCH_ARG.match(arg):
                raise ConfigError(f"--sbatch-arg {arg!r}: give one long option on one line, e.g. --qos=high")
            if arg.split("=", 1)[0] in _OWNED:
                raise ConfigError(f"--sbatch-arg {arg!r}: set this through the launcher's own flag")
        for mount in self.container_mounts:
            if not mount or "," in mount or any(c in mount for c in "\n\r\0"):
                raise ConfigError(f"--container-mounts entry {mount!r}: one 'src:dst[:flags]' per entry, no commas")
        if self.container_mounts and not self.container_image:
            raise ConfigError("--container-mounts needs --container-image")
        for flag, value in (("--python", self.python), ("--workdir", self.workdir),
                            ("--container-image", self.container_image), ("--container-workdir",
                                                                          self.container_workdir)):
            if value is not None and any(c in value for c in "\n\r\0"):
                raise ConfigError(f"{flag}={value!r} must be on one line")
        return self

    def mount_to_host(self, path: str) -> str:
        """A path as the job sees it -> the same file on the submitting host (through container mounts)."""
        for mount in sorted(self.container_mounts, key=lambda m: -len(m.split(":")[1] if ":" in m else m)):
            src, _, rest = mount.partition(":")
            dst = rest.split(":")[0] or src
            if path == dst or path.startswith(dst.rstrip("/") + "/"):
                return src + path[len(dst.rstrip("/")):]
        return path

    def describe(self) -> str:
        return " ".join(f"{f.name}={shlex.quote(str(getattr(self, f.name)))}" for f in dataclasses.fields(self))


def load_cluster(preset: str | None, overrides: Mapping[str, Any]) -> ClusterConfig:
    """A preset (a name in conf/cluster/ or a YAML path) with flag overrides (None values ignored)."""
    values: dict[str, Any] = {}
    if preset:
        path = Path(preset)
        if not path.suffix:
            path = PRESETS / f"{preset}.yaml"
        if not path.is_file():
            known = sorted(p.stem for p in PRESETS.glob("*.yaml"))
            raise ConfigError(f"--cluster={preset!r}: no such preset; known: {', '.join(known)} (or a YAML path)")
        values = yaml.safe_load(path.read_text()) or {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in dataclasses.fields(ClusterConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown cluster key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    values["env"] = {str(k): str(v) for k, v in (values.get("env") or {}).items()}
    values["container_mounts"] = [str(m) for m in values.get("container_mounts") or []]
    values["sbatch_args"] = [str(a) for a in values.get("sbatch_args") or []]
    for key in ("job_name", "partition", "account", "time", "mem"):
        if values.get(key) is not None:
            values[key] = str(values[key])
    return ClusterConfig(**values).validate()
