"""Submit a training stage to Slurm with one command; the job checkpoints on a signal and requeues (or chains)
until the run reaches max_steps.

    python -m launcher.submit --cluster dgx-h100 --nodes 4 --account proj --output-dir /results/pretrain \\
        -- model=qwen2.5-7b stage=pretrain data=manifests data.tokenizer=/models/Qwen2.5-7B-Instruct ...
    python -m launcher.submit ... --dry-run     # validate, print the sbatch script, submit nothing
    python -m launcher.submit ... --local       # the same run on this machine (python / torchrun), no Slurm

Everything after ``--`` is a Hydra override of conf/train.yaml, exactly as for examples/train.py. The config is
composed and validated (layout, batch arithmetic, paths) before anything is written or submitted. The script is
kept at ``<output_dir>/slurm/<job>_<time>.sbatch`` and logs go to ``<output_dir>/slurm/<job id>.log``.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from launcher.cluster import ClusterConfig, load_cluster
from launcher.sbatch import ENTRIES, local_command, log_dir, render, script_name, write
from launcher.validate import compose_run, hydra_value, override_values, validate_enhancer, validate_stage
from ualm_nemo.model.config import ConfigError

log = logging.getLogger("launcher")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launcher.submit", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--entry", choices=sorted(ENTRIES), default="ualm",
                   help="what the job trains: the language model (conf/train.yaml) or the enhancement VAE "
                        "(conf/enhancer.yaml); the same signals, checkpoints and requeue")
    p.add_argument("--cluster", help="preset name in conf/cluster/ (e.g. local, dgx-h100) or a YAML path")
    p.add_argument("--job-name")
    p.add_argument("--nodes", type=int)
    p.add_argument("--gpus-per-node", type=int, help="one task per GPU; 0 for CPU tasks")
    p.add_argument("--tasks-per-node", type=int, help="only with --gpus-per-node 0 (CPU runs)")
    p.add_argument("--cpus-per-task", type=int)
    p.add_argument("--mem")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--time", help="Slurm time limit, e.g. 04:00:00 or 2-00:00:00")
    p.add_argument("--signal-seconds", type=int, help="USR1 this long before the limit (checkpoint + requeue)")
    p.add_argument("--mode", choices=("requeue", "chain"), help="requeue the same job id, or chain a new job")
    p.add_argument("--max-restarts", type=int, help="jobs after preemptions/time limits (requeue or chain)")
    p.add_argument("--max-failures", type=int,
                   help="restarts after a crash (a dead or hung rank) in a row without a new checkpoint (default 3)")
    p.add_argument("--container-image", help="pyxis/enroot image (srun --container-image)")
    p.add_argument("--container-mounts", action="append", help="src:dst[:flags]; repeat or comma-separate")
    p.add_argument("--container-workdir")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="exported in the job")
    p.add_argument("--sbatch-arg", action="append", default=[], help="extra directive, e.g. --qos=high")
    p.add_argument("--python", help="interpreter in the job (default: this one; `python` in a container)")
    p.add_argument("--workdir", help="repository root as the job sees it")
    p.add_argument("--output-dir", help="the run's output_dir (checkpoints, logs, sbatch script)")
    p.add_argument("--dry-run", action="store_true", help="validate and print; write and submit nothing")
    p.add_argument("--local", action="store_true", help="run on this machine without Slurm")
    p.add_argument("overrides", nargs="*", help="Hydra overrides (after --)")
    return p


def _cluster_from_args(args: argparse.Namespace) -> ClusterConfig:
    env = {}
    for item in args.env:
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"--env {item!r}: give KEY=VALUE")
        env[key] = value
    mounts = [m for entry in args.container_mounts or [] for m in entry.split(",")] or None
    flags = {"job_name": args.job_name, "nodes": args.nodes, "gpus_per_node": args.gpus_per_node,
             "tasks_per_node": args.tasks_per_node, "cpus_per_task": args.cpus_per_task, "mem": args.mem,
             "partition": args.partition, "account": args.account, "time": args.time,
             "signal_seconds": args.signal_seconds, "mode": args.mode, "max_restarts": args.max_restarts,
             "max_failures": args.max_failures,
             "container_image": args.container_image, "container_mounts": mounts,
             "container_workdir": args.container_workdir, "python": args.python, "workdir": args.workdir,
             "sbatch_args": args.sbatch_arg or None}
    cluster = load_cluster(args.cluster, flags)
    cluster.env.update(env)
    if args.cluster is None and args.gpus_per_node is None:  # the allocation must never be a silent guess
        log.warning("note: no --cluster and no --gpus-per-node: assuming %d GPUs per node (one task each); pass "
                    "--gpus-per-node N or --cluster PRESET if the nodes differ", cluster.gpus_per_node)
    return cluster.validate()


@dataclass
class Prepared:
    args: argparse.Namespace
    cluster: ClusterConfig
    overrides: list[str]  # the user's, plus output_dir and hydra.run.dir
    output_dir: str  # as the job sees it
    script: str  # where the sbatch script is kept, as the job sees it
    text: str  # the sbatch script


def prepare(argv: list[str]) -> Prepared:
    """Parse, compose and validate everything; nothing is written."""
    args = _parser().parse_args(argv)
    cluster = _cluster_from_args(args)
    overrides = list(args.overrides)
    config_name = "enhancer" if args.entry == "enhancer" else "train"
    if args.output_dir:
        for value in override_values(overrides, "output_dir"):  # the flag wins: say so, it is easy to miss
            log.warning("the override output_dir=%s is dropped: --output-dir=%s is the run's output_dir",
                        value, args.output_dir)
    output_dir = args.output_dir or str(compose_run(overrides, config_name).get("output_dir") or "outputs/ualm")
    if not Path(output_dir).is_absolute():  # relative to the repository root, as examples/train.py resolves it
        output_dir = str(Path(cluster.workdir) / output_dir)
    output_dir = output_dir.rstrip("/") or "/"
    if any(c in output_dir for c in "\n\r\0"):
        raise ConfigError(f"--output-dir={output_dir!r} must be on one line")
    overrides += [hydra_value("output_dir", output_dir), hydra_value("hydra.run.dir", f"{output_dir}/hydra")]
    _, notes = (validate_enhancer if args.entry == "enhancer" else validate_stage)(overrides, cluster)
    for note in notes:
        log.warning("note: %s", note)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    script = f"{log_dir(output_dir)}/{script_name(cluster.job_name, stamp)}"
    header = (f"Generated by launcher/submit.py at {stamp}. Re-submit: sbatch {script}\n"
              f"Run: {output_dir} (checkpoints/, run_state, slurm/<job id>.log)")
    return Prepared(args, cluster, overrides, output_dir, script,
                    render(cluster, output_dir, overrides, script, header=header, entry=ENTRIES[args.entry]))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        job = prepare(sys.argv[1:] if argv is None else argv)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if job.args.local:
        cmd = local_command(job.cluster, job.overrides, ENTRIES[job.args.entry])
        print(f"{'would run' if job.args.dry_run else 'running'} locally: {shlex.join(cmd)}", flush=True)
        return 0 if job.args.dry_run else subprocess.run(cmd, cwd=job.cluster.workdir).returncode
    if job.args.dry_run:
        print(job.text, end="")
        return 0
    script = write(job.text, Path(job.cluster.mount_to_host(job.script)))
    result = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True,
                            cwd=job.cluster.workdir)
    if result.returncode:
        print(f"error: sbatch failed ({result.returncode}): {result.stderr.strip()}", file=sys.stderr)
        return result.returncode
    job_id = result.stdout.strip().split(";")[0]
    print(f"submitted job {job_id}\n  script: {script}\n  log:    {log_dir(job.output_dir)}/{job_id}.log")
    return 0


if __name__ == "__main__":
    sys.exit(main())
