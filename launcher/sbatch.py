"""Render the sbatch script of a stage: directives, the torch.distributed environment, srun, then requeue/chain.

Quoting, in the two languages the script speaks:
* ``#SBATCH`` lines are parsed by sbatch, not by a shell: a value is written bare when it is plain, else in double
  quotes with ``\\`` and ``"`` backslash-escaped (sbatch's directive parser; round-trip tested on a real Slurm);
  newlines are rejected before (launcher.cluster).
* every user value in the body (paths, environment values, Hydra overrides, the container image) goes through
  ``shlex.quote``: the shell never expands, splits or runs any part of it.

After srun returns, the script reads ``<output_dir>/run_state`` (written by ualm_nemo.training.preemption):
``finished`` / ``stopped`` -> exit 0; ``preempted`` -> ``scontrol requeue`` the job (mode requeue) or submit this
script again with ``--dependency=afterany`` on this job (mode chain); ``failed`` (an error a restart would repeat,
e.g. non-finite losses) -> no new job; no state (a rank killed, a rank ended by the hang watchdog, an exception) ->
srun again in the same allocation from ``checkpoints/latest``, up to ``max_failures`` times in a row without a new
checkpoint, then ``state=failed`` with the reason. A lost node makes Slurm end the job (NODE_FAIL) and requeue it
(``--requeue``) on nodes that answer.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from launcher.cluster import ClusterConfig
from ualm_nemo.model.config import ConfigError

ENTRY = "examples/train.py"
ENTRIES = {"ualm": ENTRY, "enhancer": "examples/train_enhancer.py"}  # --entry: what the job trains
_PLAIN = re.compile(r"^[A-Za-z0-9._,:/@%+=-]+$")


def directive_value(value: str) -> str:
    """A value for an ``#SBATCH --key=value`` line, as sbatch's own parser reads it back."""
    if any(c in value for c in "\n\r\0"):
        raise ConfigError(f"{value!r}: an #SBATCH value must be on one line")
    if _PLAIN.match(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def log_dir(output_dir: str) -> str:
    return f"{output_dir.rstrip('/')}/slurm"


def directives(cluster: ClusterConfig, output_dir: str) -> list[str]:
    if "%" in output_dir or "\\" in output_dir:
        raise ConfigError(f"--output-dir={output_dir!r}: '%' and '\\' are Slurm file-name pattern characters; "
                          "choose a path without them")
    args = [("job-name", cluster.job_name), ("nodes", str(cluster.nodes)),
            ("ntasks-per-node", str(cluster.ntasks_per_node))]
    if cluster.gpus_per_node:
        args.append(("gpus-per-node", str(cluster.gpus_per_node)))
    for key, value in (("cpus-per-task", cluster.cpus_per_task), ("mem", cluster.mem),
                       ("partition", cluster.partition), ("account", cluster.account)):
        if value is not None:
            args.append((key, str(value)))
    args += [("time", cluster.time), ("signal", f"USR1@{cluster.signal_seconds}")]
    lines = [f"#SBATCH --{key}={directive_value(value)}" for key, value in args]
    lines += ["#SBATCH --requeue" if cluster.mode == "requeue" else "#SBATCH --no-requeue",
              "#SBATCH --open-mode=append",  # a requeued job keeps its id: its log continues
              f"#SBATCH --output={directive_value(log_dir(output_dir) + '/%j.log')}"]
    for extra in cluster.sbatch_args:
        key, eq, value = extra.partition("=")
        lines.append(f"#SBATCH {key}={directive_value(value)}" if eq else f"#SBATCH {key}")
    return lines


def srun_command(cluster: ClusterConfig, overrides: list[str], entry: str = ENTRY) -> list[str]:
    cmd = ["srun", "--kill-on-bad-exit=1", f"--ntasks-per-node={cluster.ntasks_per_node}"]
    if cluster.container_image:
        cmd.append(f"--container-image={cluster.container_image}")
        if cluster.container_mounts:
            cmd.append(f"--container-mounts={','.join(cluster.container_mounts)}")
        cmd.append(f"--container-workdir={cluster.container_workdir or cluster.workdir}")
    return cmd + [cluster.python_exe, entry, *overrides]


def local_command(cluster: ClusterConfig, overrides: list[str], entry: str = ENTRY) -> list[str]:
    """The same training run without Slurm (one machine): plain python, or torchrun for several tasks."""
    if cluster.ntasks_per_node == 1:
        return [cluster.python_exe, entry, *overrides]
    return [cluster.python_exe, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={cluster.ntasks_per_node}", entry, *overrides]


def render(cluster: ClusterConfig, output_dir: str, overrides: list[str], script_path: str,
           header: str = "", entry: str = ENTRY) -> str:
    """The whole sbatch script. ``script_path``: where it is kept (chain mode submits it again)."""
    q = shlex.quote
    env = [f"export {key}={q(value)}" for key, value in sorted(cluster.env.items())]
    srun = " \\\n      ".join(q(part) for part in srun_command(cluster, overrides, entry))
    resubmit = {
        "requeue": ['echo "[launcher] requeueing job $SLURM_JOB_ID"',
                    'scontrol requeue "$SLURM_JOB_ID"',
                    "exit $?"],
        "chain": ['next="$(sbatch --parsable --dependency="afterany:$SLURM_JOB_ID" '
                  '--export="ALL,UALM_CHAIN_INDEX=$(( ${UALM_CHAIN_INDEX:-0} + 1 ))" "$SCRIPT")" || exit 1',
                  'echo "[launcher] chained job $next (runs after $SLURM_JOB_ID)"',
                  "exit 0"],
    }[cluster.mode]
    body = [
        "#!/bin/bash",
        *(f"# {line}" for line in header.splitlines()),
        *directives(cluster, output_dir),
        "",
        "set -uo pipefail",
        f"cd {q(cluster.workdir)} || exit 1",
        *env,
        "export PYTHONUNBUFFERED=1",
        "# torch.distributed rendezvous: the first node of the allocation, a port derived from the job id, its restart",
        "# count and the attempt in this allocation (ranks and world size come from SLURM_PROCID/LOCALID/NTASKS)",
        'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
        f"OUTPUT_DIR={q(output_dir)}",
        f"SCRIPT={q(script_path)}",
        'STATE="$OUTPUT_DIR/run_state"',
        'FAILURES_FILE="$OUTPUT_DIR/failure_count"  # "<failures> <latest checkpoint at the last failure>"',
        f"MAX_RESTARTS={int(cluster.max_restarts)}",
        f"MAX_FAILURES={int(cluster.max_failures)}",
        'RESTARTS="$(( ${SLURM_RESTART_COUNT:-0} + ${UALM_CHAIN_INDEX:-0} ))"',
        "attempt=0",
        'failures=0; since=""',
        '[ -f "$FAILURES_FILE" ] && read -r failures since < "$FAILURES_FILE"',
        "while :; do",
        '  export MASTER_PORT="$(( 20000 + (SLURM_JOB_ID + 997 * ${SLURM_RESTART_COUNT:-0} + 131 * attempt) % 20000 ))"',
        '  echo "[launcher] job $SLURM_JOB_ID restart $RESTARTS attempt $attempt on $SLURM_JOB_NODELIST:' +
        ' $SLURM_NTASKS tasks, master $MASTER_ADDR:$MASTER_PORT, $(date -u +%FT%TZ)"',
        '  rm -f -- "$STATE"',
        "  " + srun,
        "  rc=$?",
        "  state=\"$(sed -n 's/^state=//p' \"$STATE\" 2>/dev/null)\"",
        "  step=\"$(sed -n 's/^step=//p' \"$STATE\" 2>/dev/null)\"",
        "  reason=\"$(sed -n 's/^reason=//p' \"$STATE\" 2>/dev/null)\"",
        '  echo "[launcher] srun exit $rc at $(date +%s.%N); run state ${state:-none} at step ${step:-?}"',
        '  case "$state" in',
        '    finished) rm -f -- "$FAILURES_FILE"; echo "[launcher] max_steps reached: no further job"; exit 0 ;;',
        '    stopped) echo "[launcher] stopped before max_steps (train.stop_at_step): no further job"; exit 0 ;;',
        "    preempted)",
        '      if (( RESTARTS >= MAX_RESTARTS )); then',
        '        echo "[launcher] $RESTARTS restarts reached max_restarts=$MAX_RESTARTS: no further job" >&2; exit 1',
        "      fi",
        *(f"      {line}" for line in resubmit),
        "      ;;",
        '    failed) echo "[launcher] training failed: $reason; not restarted (it would fail the same way)" >&2',
        '       exit $(( rc ? rc : 1 )) ;;',
        "  esac",
        "  # no run state: a rank died or was ended by the hang watchdog, or a node was lost (then Slurm ends the",
        "  # job and requeues it without that node). Restart in this allocation from checkpoints/latest, up to",
        "  # MAX_FAILURES times in a row without a new checkpoint between them.",
        '  latest="$(cat -- "$OUTPUT_DIR/checkpoints/latest" 2>/dev/null)"',
        '  [ "$since" = "${latest:-none}" ] || failures=0',
        '  since="${latest:-none}"; failures=$(( failures + 1 ))',
        '  echo "$failures $since" 2>/dev/null > "$FAILURES_FILE"',
        '  if (( failures > MAX_FAILURES )); then',
        '    msg="$(( failures - 1 )) restarts after failures since checkpoint ${latest:-none} (max_failures=$MAX_FAILURES)"',
        '    mkdir -p -- "$OUTPUT_DIR"; printf \'state=failed\\nstep=%s\\nreason=%s\\n\' "${latest#iter_}" "$msg" > "$STATE.tmp" && mv -f -- "$STATE.tmp" "$STATE"',
        '    echo "[launcher] training failed (srun exit $rc, no run state): $msg; no further job" >&2',
        '    exit $(( rc ? rc : 1 ))',
        "  fi",
        '  echo "[launcher] training failed (srun exit $rc, no run state): restart $failures/$MAX_FAILURES in this' +
        ' allocation from ${latest:-the start}"',
        "  attempt=$(( attempt + 1 ))",
        '  sleep "${UALM_RESTART_DELAY_S:-2}"',
        "done",
        "",
    ]
    return "\n".join(body)


def script_name(job_name: str, stamp: str) -> str:
    """A file name from a job name (anything outside [A-Za-z0-9._-] becomes _)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", job_name)[:64].lstrip(".") + f"_{stamp}.sbatch"


def write(text: str, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path
