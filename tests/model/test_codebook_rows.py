"""The training loss scores streams 1..N-1 only at positions with a codebook label (model/heads.py
``_codebook_nll``); this proves it equal to the full computation, the codebook logits of every position (the
decoding path, ``heads.logits``) scored by hand: same per-stream nll and same gradients of every parameter, on a
text-only batch (no codebook position at all), a mixed batch (prompts, audio frames, padding) and an audio
batch (codebook labels at every position, each stream's dropped at random), at TP1 and at TP2 with sequence
parallelism, for both head kinds."""

from __future__ import annotations

import pytest
import torch

from ualm_nemo.testing.dist import run_distributed


def _batches(vocab) -> dict[str, dict[str, torch.Tensor]]:
    from ualm_nemo.model.vocab import IGNORE_INDEX
    from ualm_nemo.testing.batches import random_batch

    mixed = {k: v for k, v in random_batch(vocab, 2, seed=5).model_inputs().items() if v is not None}
    text = {k: v.clone() for k, v in mixed.items()}
    text["labels"][..., 1:] = IGNORE_INDEX
    text["loss_weights"][..., 1:] = 0.0
    audio = {k: v.clone() for k, v in mixed.items()}
    gen = torch.Generator().manual_seed(6)
    shape = audio["labels"].shape[:2]
    for n in range(1, vocab.num_codebooks):  # a codebook label at every position, padding rows included
        audio["labels"][..., n] = vocab.codebook_start(n) + torch.randint(0, vocab.codebook_span, shape, generator=gen)
    audio["loss_weights"][..., 1:] = 0.125
    # some streams of a position without a label, others with (a position is scored if any stream has one)
    audio["labels"][..., 1:][torch.rand(audio["labels"][..., 1:].shape, generator=gen) < 0.3] = IGNORE_INDEX
    return {"text": text, "mixed": mixed, "audio": audio}


def _full_nll(model, batch, vocab) -> torch.Tensor:
    """[b, s, N] from the logits of every position (``heads.logits``), by plain cross-entropy."""
    import torch.nn.functional as F

    from ualm_nemo.model.vocab import IGNORE_INDEX

    stream0, codebooks = model(batch["tokens"])  # [b, s, V], [b, s, N-1, span]
    labels = batch["labels"]
    nll = [F.cross_entropy(stream0.transpose(1, 2).float(), labels[..., 0], ignore_index=IGNORE_INDEX,
                           reduction="none")]
    for n in range(1, vocab.num_codebooks):
        target = labels[..., n] - vocab.codebook_start(n)
        target = target.masked_fill(labels[..., n] == IGNORE_INDEX, IGNORE_INDEX)
        nll.append(F.cross_entropy(codebooks[:, :, n - 1].transpose(1, 2).float(), target,
                                   ignore_index=IGNORE_INDEX, reduction="none"))
    return torch.stack(nll, dim=-1)


def _grads(model, nll: torch.Tensor, weights: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    (nll * weights).sum().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _compare(tp: int, sp: bool) -> dict:
    from ualm_nemo.distributed.parallel import init_model_parallel
    from ualm_nemo.model.builder import build_model
    from ualm_nemo.model.config import BACKBONES, AudioInputConfig, AudioOutputConfig, UALMConfig

    out = {}
    for head in ("shared", "per_codebook"):
        cfg = UALMConfig(backbone=BACKBONES["tiny"], audio_in=AudioInputConfig(enabled=False),
                         audio_out=AudioOutputConfig(head=head)).with_parallel(
            tensor_model_parallel_size=tp, sequence_parallel=sp)
        init_model_parallel(cfg.parallel, seed=11)
        model = build_model(cfg)  # train mode (dropout is 0 in the tiny backbone)
        for kind, batch in _batches(cfg.vocab).items():
            rows = model(batch["tokens"], batch["labels"], per_stream=True)  # [b, s, N]
            rows_grads = _grads(model, rows, batch["loss_weights"])
            full = _full_nll(model, batch, cfg.vocab)
            full_grads = _grads(model, full, batch["loss_weights"])
            out[head, kind] = {"rows": rows.detach(), "full": full.detach(), "rows_grads": rows_grads,
                               "full_grads": full_grads, "codebook_labels": int((batch["labels"][..., 1:] >= 0).sum())}
    return out


@pytest.mark.parametrize("tp,sp", [(1, False), (2, True)], ids=["tp1", "tp2-sp"])
def test_scored_rows_equal_full_codebook_logits(tp, sp):
    for rank, results in run_distributed(tp, _compare, tp, sp).items():
        for (head, kind), r in results.items():
            where = f"rank {rank}, {head} head, {kind} batch"
            assert (r["codebook_labels"] == 0) == (kind == "text"), where
            torch.testing.assert_close(r["rows"], r["full"], rtol=1e-5, atol=1e-6, msg=where)
            assert float(r["full"][..., 1:].sum()) > 1.0 or kind == "text", where  # real codebook loss
            assert r["rows_grads"].keys() == r["full_grads"].keys(), where  # every parameter reached
            for name, grad in r["full_grads"].items():  # fp32 summation order: 1e-5 of the largest entry
                torch.testing.assert_close(r["rows_grads"][name], grad, rtol=1e-4, atol=1e-5 * float(grad.abs().max()),
                                           msg=f"{where}: grad of {name}")
