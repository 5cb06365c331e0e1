"""Score the DPO reference once: every pair's per-stream log-probs under the reference checkpoint -> sidecar.

Takes the same run config as the DPO run it serves (``stage=dpo``, ``data.dpo_manifest``, ``dpo.*``) and runs
at any layout: each data-parallel rank scores every DP-th pair in micro-batches of ``train.micro_batch_size``
pairs, forward only (``MegatronEngine.row_log_probs``, vocab-parallel under TP, last pipeline stage), and rank 0
writes ``dpo.reference_logps`` with the fingerprint training checks (reference.py).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from ualm_nemo.model.config import ConfigError
from ualm_nemo.training.dpo_reference import fingerprint, pair_table, reference_step, write_sidecar

if TYPE_CHECKING:
    from ualm_nemo.training.run_config import RunConfig

log = logging.getLogger(__name__)


def scoring_run(cfg: Mapping[str, Any]) -> RunConfig:
    """The run config, refused (ConfigError naming the key) unless it is a DPO run whose reference can be scored
    here: the dpo keys set, and every input folder and file present (check_local_paths). Needs no process group,
    so the command says a missing ``dpo.reference_checkpoint`` or ``train.init_from`` before starting one."""
    from ualm_nemo.training.run_config import check_local_paths, run_config_from_dict

    run = run_config_from_dict(dict(cfg))
    dpo = run.dpo
    if run.train.stage != "dpo" or dpo is None:
        raise ConfigError("score_reference scores a DPO run's pairs: give stage=dpo and its data / dpo keys")
    if not dpo.reference_checkpoint:
        raise ConfigError("dpo.reference_checkpoint: the checkpoint to score (usually the SFT result)")
    if not dpo.reference_logps:
        raise ConfigError("dpo.reference_logps: where to write the sidecar")
    check_local_paths(run)
    return run


def score_reference(cfg: Mapping[str, Any]) -> Path:
    """Write the sidecar named by ``dpo.reference_logps``; returns its path. Run inside torch.distributed."""
    from lightning.fabric.utilities import move_data_to_device
    from tqdm import tqdm

    from ualm_nemo.data.posttrain_dataset import collate_pairs
    from ualm_nemo.distributed.parallel import init_model_parallel
    from ualm_nemo.training.dpo_reference import load_reference_model
    from ualm_nemo.training.data_setup import build_train_dataset
    from ualm_nemo.training.engine import row_log_probs

    run = scoring_run(cfg)
    dpo = run.dpo
    run.validate(dist.get_world_size())
    # one batch per call: interleaved stages (a training-throughput layout) would need PP micro-batches per call;
    # scoring without them reads the same weights and gives the same log-probs
    run = dataclasses.replace(run, model=run.model.with_parallel(virtual_pipeline_model_parallel_size=None))
    init_model_parallel(run.model.parallel, run.train.seed)
    dataset, _ = build_train_dataset(run.data, run.model, run.output_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    reference = [chunk.to(device) for chunk in load_reference_model(run.model, dpo.reference_checkpoint)]
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    mine = list(range(dp_rank, len(dataset), dp))
    per_call = run.train.micro_batch_size
    last = parallel_state.is_pipeline_last_stage()
    table: dict[str, dict[str, list[float]]] = {}
    # every DP rank takes the same number of calls (collectives inside the schedule must pair up): the last
    # calls of a rank with fewer pairs repeat its first pair and throw the result away
    calls = -(-(-(-len(dataset) // dp)) // per_call)
    for k in tqdm(range(calls), desc="reference log-probs", disable=dist.get_rank() != 0):
        chunk = mine[k * per_call:(k + 1) * per_call]
        batch = collate_pairs([dataset[i] for i in (chunk or mine[:1] or [0])], run.model.vocab)
        batch = move_data_to_device(batch, device)
        reports = row_log_probs(reference, run.model.vocab, [batch])
        if last and chunk:
            table.update(pair_table(batch.pair_ids, reports[0]["row_logps"].cpu()))
    gathered: list[dict | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, table if last and parallel_state.get_tensor_model_parallel_rank() == 0 else {})
    out = Path(dpo.reference_logps)
    if dist.get_rank() == 0:
        merged: dict[str, dict[str, list[float]]] = {}
        for part in gathered:
            merged.update(part or {})
        if len(merged) != len(dataset):
            raise RuntimeError(f"scored {len(merged)} pairs of {len(dataset)}")
        stamp = fingerprint(dpo.reference_checkpoint, reference_step(dpo.reference_checkpoint), run.data.dpo_manifest,
                            run.data.tokenizer, run.model.vocab.text_vocab_size, run.model.vocab.num_codebooks)
        write_sidecar(out, stamp, merged)
        log.info("wrote the reference log-probs of %d pairs to %s", len(merged), out)
    dist.barrier()
    return out
