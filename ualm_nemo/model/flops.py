"""Model FLOPs of one training token: the one formula launcher.plan sizes a run with and the training log's
TFLOP/s and MFU are measured against (training/throughput.py), so a plan and a run can be compared directly."""

from __future__ import annotations

from ualm_nemo.model.config import UALMConfig, padded

# peak dense BF16 tensor-core FLOP/s (no sparsity) and memory per GPU: launcher.plan's --gpu choices
GPUS = {"h100": (989e12, 80e9), "h200": (989e12, 141e9), "a100": (312e12, 80e9)}


def flops_per_token(cfg: UALMConfig, seq_len: int) -> dict[str, float]:
    """Model FLOPs of one training token (forward + backward = 3 x forward), Megatron's convention:
    6 N + 12 L h s. N counts the weights each token multiplies: the decoder's matmul weights
    (QKV (a + 2g) d h, proj h a d, SwiGLU 3 f h per layer) and the heads (stream 0 over the padded text + audio
    columns, (N-1) codebooks of codebook_size + 1 rows); embedding lookups, norms and biases cost ~nothing.
    12 L h s is attention (QK^T and AV, 2 x 2 s h per layer forward) with no causal halving: an upper bound.
    The frozen encoder's forward (2 x its parameters per 25 Hz audio frame, only on audio-input positions) and
    recomputation are not model FLOPs and are not counted."""
    b = cfg.backbone
    h, d, a, g, f = b.hidden_size, b.kv_channels, b.num_attention_heads, b.num_query_groups, b.ffn_hidden_size
    decoder = b.num_layers * ((a + 2 * g) * d * h + h * a * d + 3 * f * h)
    heads = (padded(cfg.num_text_rows) + padded(cfg.num_audio_rows)) * h \
        + (cfg.audio_out.num_codebooks - 1) * cfg.vocab.codebook_span * h
    dense, attention = 6.0 * (decoder + heads), 12.0 * b.num_layers * h * seq_len
    return {"matmul_params": decoder + heads, "dense": dense, "attention": attention, "total": dense + attention}


def peak_flops(device_name: str) -> float | None:
    """Peak dense BF16 FLOP/s of a GPU from its name (torch.cuda.get_device_name, e.g. "NVIDIA H100 80GB HBM3"),
    None for a device not in GPUS (a CPU, an unknown card): MFU is then not reported rather than guessed."""
    name = device_name.lower()
    return next((peak for gpu, (peak, _) in GPUS.items() if gpu in name), None)
