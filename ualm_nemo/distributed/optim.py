"""Megatron DDP, the (distributed) Megatron optimizer and the warmup-cosine schedule."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer, get_standard_config_overrides
from megatron.core.optimizer.optimizer_config import ParamKey
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler, ParamGroupOverride

from ualm_nemo.compat import mcore_patches
from ualm_nemo.model.config import ConfigError, UALMConfig

# attribute of a parameter whose gradient is masked to some rows (training/stages.py): no weight decay for it
PARTIALLY_FROZEN = "partially_frozen"


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW with warmup-cosine (paper: lr 1e-4, betas (0.9, 0.95), clip 1.0)."""

    lr: float = 1e-4
    min_lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_grad: float = 1.0
    warmup_steps: int = 0

    def validate(self) -> "OptimConfig":
        if not self.lr > 0:
            raise ConfigError(f"optim.lr={self.lr} must be positive")
        if not (len(self.betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas)):
            raise ConfigError(f"optim.betas={list(self.betas)} must be two numbers in [0, 1)")
        for key in ("eps", "weight_decay", "clip_grad"):
            if getattr(self, key) < 0 or (key == "eps" and self.eps == 0):
                raise ConfigError(f"optim.{key}={getattr(self, key)} must be {'positive' if key == 'eps' else '>= 0'}")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"optim.min_lr={self.min_lr} must lie in [0, optim.lr={self.lr}]")
        if self.warmup_steps < 0:
            raise ConfigError("optim.warmup_steps must be >= 0")
        return self


def wrap_ddp(chunks: list[torch.nn.Module], model_cfg: UALMConfig) -> list[DistributedDataParallel]:
    """Megatron DDP per chunk. Grads accumulate and reduce in an fp32 buffer unless
    model.parallel.grad_reduce_in_bf16 (bf16 params); model.parallel.overlap_grad_reduce / overlap_param_gather
    run the bucketed collectives during the backward / the next forward."""
    p = model_cfg.parallel
    ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=not p.grad_reduce_in_bf16,
                                            overlap_grad_reduce=p.overlap_grad_reduce,
                                            overlap_param_gather=p.overlap_param_gather,
                                            use_distributed_optimizer=p.use_distributed_optimizer)
    wrapped = [DistributedDataParallel(chunk.config, ddp_cfg, chunk) for chunk in chunks]
    if p.overlap_param_gather:
        for ddp, chunk in zip(wrapped, chunks):
            for part in (getattr(chunk, "embedding", None), getattr(chunk, "heads", None)):
                if part is not None:
                    _gather_on_entry(ddp, part)
    config = chunks[0].config
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = wrapped[0].no_sync if len(wrapped) == 1 else [w.no_sync for w in wrapped]
    return wrapped


def _gather_on_entry(ddp: DistributedDataParallel, module: torch.nn.Module) -> None:
    """Finish the param all-gather of every weight under ``module`` when its forward starts.

    Megatron's overlapped gather waits per module for that module's own parameters, in its forward pre-hook. The
    stream embedding and the heads read their tables' weights directly (embedding.py, heads.py), never calling
    those child modules, so no hook would wait for them: measured, DP2 trained on stale rows from step 2.
    """
    groups = {ddp.param_to_bucket_group[p] for p in module.parameters() if p in ddp.param_to_bucket_group}
    ordered = [g for g in ddp.bucket_groups if g in groups]

    def hook(*unused):
        for group in ordered:
            group.finish_param_sync()

    module.register_forward_pre_hook(hook)


def build_optimizer(chunks: list[DistributedDataParallel], optim: OptimConfig, model_cfg: UALMConfig):
    mcore_patches.apply()
    bf16 = model_cfg.params_dtype == "bf16"
    cfg = OptimizerConfig(
        optimizer="adam", lr=optim.lr, min_lr=optim.min_lr, weight_decay=optim.weight_decay,
        adam_beta1=optim.betas[0], adam_beta2=optim.betas[1], adam_eps=optim.eps, clip_grad=optim.clip_grad,
        bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=model_cfg.parallel.use_distributed_optimizer,
        overlap_param_gather=model_cfg.parallel.overlap_param_gather,  # same value as the DDP config (megatron)
    )
    # megatron's standard groups (no decay on biases and 1-d params), plus no decay on a partly frozen table:
    # decoupled decay would move its frozen rows (training/stages.py)
    overrides = {**get_standard_config_overrides(cfg), ParamKey(attr=PARTIALLY_FROZEN): ParamGroupOverride(wd_mult=0.0)}
    return get_megatron_optimizer(cfg, chunks, config_overrides=overrides)


def build_scheduler(optimizer, optim: OptimConfig, max_steps: int) -> OptimizerParamScheduler:
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0 if optim.warmup_steps else optim.lr, max_lr=optim.lr, min_lr=optim.min_lr,
        lr_warmup_steps=optim.warmup_steps, lr_decay_steps=max(max_steps, optim.warmup_steps + 1),
        lr_decay_style="cosine", start_wd=optim.weight_decay, end_wd=optim.weight_decay,
        wd_incr_steps=max(max_steps, 1), wd_incr_style="constant",
    )
