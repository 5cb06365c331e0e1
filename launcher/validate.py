"""Check a stage before it is submitted: the composed Hydra config, its parallel layout on this allocation,
the batch arithmetic and the input paths. Every error names the key or flag to change (``ConfigError``); the
independent checks (layout, model, each path) are all run and their problems listed together (``ConfigErrors``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from launcher.cluster import REPO, ClusterConfig
from ualm_nemo.model.builder import check_buildable
from ualm_nemo.config_types import Problems
from ualm_nemo.model.config import ConfigError
from ualm_nemo.training.run_config import RunConfig, check_data_paths, check_input_folders, run_config_from_dict

log = logging.getLogger(__name__)

def hydra_value(key: str, value: str) -> str:
    """``key='value'`` that Hydra parses back to exactly ``value`` (else a ConfigError naming the key)."""
    override = f'{key}="' + value.replace('"', '\\"') + '"'
    if "${" in value or _parse(override)[0].value() != value:
        raise ConfigError(f"{key}={value!r}: Hydra cannot carry this value verbatim (avoid '${{' and a backslash "
                          "before a quote); choose another")
    return override


def _parse(*overrides: str):
    try:
        return OverridesParser.create().parse_overrides(list(overrides))
    except Exception as err:  # hydra's OverrideParseException carries the grammar's message
        raise ConfigError(f"invalid Hydra override(s) {list(overrides)!r}: {err}") from None


def override_values(overrides: list[str], key: str) -> list[str]:
    """The values ``overrides`` give ``key`` (``key=v``, ``+key=v``, ``++key=v``), in order, as written."""
    parsed = _parse(*overrides) if overrides else []
    return [text.split("=", 1)[1] for text, o in zip(overrides, parsed) if o.key_or_group == key and "=" in text]


def compose_run(overrides: list[str], config_name: str = "train") -> dict[str, Any]:
    """The training config exactly as examples/train.py (``train``) or examples/train_enhancer.py (``enhancer``)
    composes it (hydra.* overrides are checked, not used)."""
    parsed = _parse(*overrides) if overrides else []
    run_overrides = [text for text, o in zip(overrides, parsed) if not o.key_or_group.startswith("hydra")]
    try:
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
            cfg = compose(config_name=config_name, overrides=run_overrides)
        values = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        values.pop("hydra", None)
        return values
    except ConfigError:
        raise
    except Exception as err:  # composition errors: unknown groups/keys, missing mandatory values (???)
        lines = [line.strip() for line in str(err).splitlines() if line.strip() and "HYDRA_FULL_ERROR" not in line]
        if err.__cause__ is not None and str(err.__cause__):
            lines.insert(1, str(err.__cause__).splitlines()[0])  # e.g. "Key 'max_step' is not in struct"
        message = " ".join(lines[:3]) or type(err).__name__
        hint = ""
        if "not in struct" in message:
            hint = " (a key the config does not define: add it with '+key=value', or fix its spelling)"
        if "Missing mandatory value" in message:
            hint = " (a '???' value in conf/: give it on the command line)"
        raise ConfigError(f"the training config does not compose: {message}{hint}") from None


def check_layout(run: RunConfig, cluster: ClusterConfig) -> None:
    p = run.model.parallel
    tp, pp, per_node = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, cluster.ntasks_per_node
    if tp > per_node or per_node % tp:
        raise ConfigError(f"model.parallel.tensor_model_parallel_size={tp} must divide the tasks per node "
                          f"({per_node}, --gpus-per-node): tensor parallelism stays inside a node")
    run.validate(cluster.world_size)  # TP x PP x CP divides the world and the model; batch % (micro x DP)
    dp = p.data_parallel_size(cluster.world_size)
    log.info("layout: %d nodes x %d tasks = %d; TP %d x PP %d x CP %d x DP %d; %d micro-batches of %d per step",
             cluster.nodes, per_node, cluster.world_size, tp, pp, p.context_parallel_size, dp,
             run.train.global_batch_size // (run.train.micro_batch_size * dp), run.train.micro_batch_size)


def check_paths(run: RunConfig, cluster: ClusterConfig) -> None:
    """Every input through the container mounts: the input folders (run_config.check_input_folders: present, and
    not empty where a model's files must be), the manifests and each Shar source (its shards/ folder and task, as
    training checks them). Every problem is listed in one ConfigErrors."""
    where = " (container mounts mapped)" if cluster.container_mounts else ""
    problems = Problems()
    with problems.check():
        check_input_folders(run, cluster.mount_to_host, where)
    with problems.check(suffix=where):
        check_data_paths(run, cluster.mount_to_host)
    problems.raise_all()


def check_progress(run: RunConfig, cluster: ClusterConfig) -> list[str]:
    """Warnings (not errors) about the run's state on disk."""
    from ualm_nemo.training.preemption import read_run_state

    notes = []
    host_out = cluster.mount_to_host(run.output_dir)
    state = read_run_state(host_out)
    if state.get("state") == "finished" and int(state.get("step", 0)) >= run.train.max_steps:
        notes.append(f"{run.output_dir} already reached max_steps={run.train.max_steps}: the job will end at once")
    if run.train.stop_at_step is not None:
        notes.append(f"train.stop_at_step={run.train.stop_at_step}: the job ends there and does not chain")
    return notes


def validate_stage(overrides: list[str], cluster: ClusterConfig) -> tuple[RunConfig, list[str]]:
    """Compose and check everything; returns the run config and warnings."""
    cluster.validate()
    cfg = compose_run(overrides)
    run = run_config_from_dict(cfg)
    problems = Problems()  # layout, model and paths are independent: all their problems in one error
    with problems.check():
        check_layout(run, cluster)
    # Transformer Engine (FP8, the TE spec) is checked here only when the job runs in this host's environment;
    # with --container-image it runs in the image, whose TE the host cannot see (build_model checks it there)
    with problems.check():
        check_buildable(run.model, check_imports=not cluster.container_image)
    with problems.check():
        check_paths(run, cluster)
    problems.raise_all()
    return run, check_progress(run, cluster)


def validate_enhancer(overrides: list[str], cluster: ClusterConfig) -> tuple[Any, list[str]]:
    """The enhancement VAE's run (conf/enhancer.yaml): keys, batch per task, the data and codec paths."""
    from ualm_nemo.enhance.config import EnhancerRun

    cluster.validate()
    try:
        run = EnhancerRun.from_dict(compose_run(overrides, "enhancer"))
    except TypeError as err:
        raise ConfigError(f"enhancer config: {err}") from None
    problems = Problems()  # every problem in one error, as for the UALM stages
    if run.train.global_batch_size % cluster.world_size:
        problems.add(f"train.global_batch_size={run.train.global_batch_size} must be divisible by the "
                     f"{cluster.world_size} tasks (--nodes x --gpus-per-node)")
    for key, value in (("train.data", run.train.data), ("train.codec_round_trip", run.train.codec_round_trip)):
        if value and not Path(cluster.mount_to_host(str(value))).exists():
            problems.add(f"{key}={value!r}: no such file or folder on this host")
    problems.raise_all()
    return run, []
