"""The DPO reference: log-probs precomputed into a sidecar keyed by pair id, checked by a fingerprint.

Sidecar (``dpo.reference_logps``, JSON, written atomically by ``examples/score_reference.py``)::

    {"fingerprint": {"reference_checkpoint": "/abs/iter_0001000", "reference_step": 1000,
                     "data": "<sha256 of the pair manifest>", "tokenizer": "byte", "text_vocab_size": 320,
                     "num_streams": 8},
     "logps": {"pair-17": {"chosen": [8 floats], "rejected": [8 floats]}, ...}}

Per-stream sequence log-probs (``training/objectives.row_log_probs``) are stored, not their weighted sum, so
``dpo.stream_weights`` can change without rescoring. The reference is scored at any layout (TP/PP/DP) and is
valid for any training layout. Training refuses a sidecar whose fingerprint does not match its own data,
tokenizer and (when given) reference checkpoint, and names every pair that has no entry.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ualm_nemo.data.microbatch import MicroBatch
from ualm_nemo.eval.checkpoints import sha256
from ualm_nemo.model.config import ConfigError

SIDES = ("chosen", "rejected")


def fingerprint(reference_checkpoint: str | Path | None, reference_step: int | None, manifest: str | Path,
                tokenizer: str, text_vocab_size: int, num_streams: int) -> dict[str, Any]:
    return {"reference_checkpoint": str(Path(reference_checkpoint).resolve()) if reference_checkpoint else None,
            "reference_step": reference_step, "data": sha256(manifest), "tokenizer": str(tokenizer),
            "text_vocab_size": int(text_vocab_size), "num_streams": int(num_streams)}


def write_sidecar(path: str | Path, stamp: Mapping[str, Any], logps: Mapping[str, Mapping[str, Sequence[float]]]
                  ) -> None:
    """Write atomically (a killed scorer leaves no half file that training would read)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    # repr of a Python float round-trips exactly: the offline reference equals the online one bit for bit
    tmp.write_text(json.dumps({"fingerprint": dict(stamp), "logps": logps}))
    os.replace(tmp, path)


def load_sidecar(path: str | Path, expected: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """-> {pair id: [2, N] float64 (chosen, rejected)}; ConfigError naming each fingerprint field that differs.

    ``expected["reference_checkpoint"]`` None means "not given": that field is then not compared."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"dpo.reference_logps={str(path)!r}: no such file (write it with "
                          "examples/score_reference.py)")
    try:
        content = json.loads(path.read_text())
        stamp, table = content["fingerprint"], content["logps"]
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"dpo.reference_logps={str(path)!r} is not a reference sidecar ({err}): rescore it") from err
    differs = [f"{key}: sidecar {stamp.get(key)!r}, this run {value!r}" for key, value in expected.items()
               if value is not None and stamp.get(key) != value]
    if differs:
        raise ConfigError(f"dpo.reference_logps={str(path)!r} was scored for other inputs (" + "; ".join(differs)
                          + "): rescore with examples/score_reference.py")
    return {pair: torch.tensor([entry[side] for side in SIDES], dtype=torch.float64) for pair, entry in table.items()}


def check_coverage(table: Mapping[str, torch.Tensor], pair_ids: Sequence[str], path: str | Path) -> None:
    missing = [p for p in pair_ids if p not in table]
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise ConfigError(f"dpo.reference_logps={str(path)!r} has no entry for {len(missing)} of {len(pair_ids)} "
                          f"training pairs ({shown}): rescore with examples/score_reference.py")


def attach(batch: MicroBatch, table: Mapping[str, torch.Tensor]) -> MicroBatch:
    """Set ``ref_logps`` [2P, N] (rows interleaved chosen, rejected like the batch) from the sidecar table."""
    batch.ref_logps = torch.cat([table[p] for p in batch.pair_ids])  # float64, as the online reference
    return batch


def pair_table(pair_ids: Sequence[str], row_logps: torch.Tensor) -> dict[str, dict[str, list[float]]]:
    """Rows interleaved chosen, rejected [2P, N] -> the sidecar's ``logps`` entries."""
    rows = row_logps.double().tolist()
    return {p: {"chosen": rows[2 * k], "rejected": rows[2 * k + 1]} for k, p in enumerate(pair_ids)}


def load_reference_model(model_cfg, path: str | Path) -> list[torch.nn.Module]:
    """The frozen reference of online DPO: the model built at this run's layout with the weights of ``path`` (a
    run's checkpoint folder or one iteration, any saved layout), no optimizer, RNG untouched (exact resume); one
    chunk per virtual stage under VPP, like the policy (the step's schedule runs both)."""
    from ualm_nemo.model.config import check_same_model
    from ualm_nemo.distributed import checkpoint
    from ualm_nemo.model.builder import build_model_chunks

    iteration = checkpoint.resolve_checkpoint(path)
    stored = checkpoint.stored_model_config(iteration)
    if stored is not None:
        check_same_model(stored, model_cfg)
    chunks = build_model_chunks(model_cfg, initialize=False)
    checkpoint.load_checkpoint(iteration, chunks, None, restore_rng=False)
    return chunks


def reference_step(path: str | Path) -> int:
    """The training step of the reference checkpoint (recorded in the sidecar's fingerprint)."""
    from ualm_nemo.distributed import checkpoint

    iteration = checkpoint.resolve_checkpoint(path)
    return int(torch.load(iteration / "ualm_common.pt", weights_only=False).get("step", 0))
