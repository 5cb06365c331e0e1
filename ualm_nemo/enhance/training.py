"""Train the enhancement VAE on one or many GPUs (or CPU processes) with Lightning Fabric's DDP.

One step: the VAE reconstructs the batch; the discriminator takes a hinge step on (real, generated.detach()); the
VAE takes its step on the spectral + KL + adversarial + feature-matching sum; the EMA copy follows. Generator and
discriminator are separate DDP modules, each seeing one forward per backward (the HiFi-GAN pattern). bf16 autocast
on GPUs, fp32 on CPU. The run resumes exactly (model, both optimisers, EMA and step; batches and posterior noise
are functions of (seed, step, sample)), checkpoints on SIGUSR1/SIGTERM and writes the same ``run_state`` file as
the language model, so launcher.submit's batch script requeues it the same way.
"""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from lightning.fabric import Fabric
from lightning.fabric.loggers import TensorBoardLogger
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from ualm_nemo.enhance import checkpoints
from ualm_nemo.enhance.config import EnhancerRun, LossWeights
from ualm_nemo.enhance.data import AUDIO_SUFFIXES, ClipSet, PairBatches, read_clips
from ualm_nemo.enhance.discriminator import MultiScaleSTFTDiscriminator
from ualm_nemo.enhance.losses import GeneratorLoss, discriminator_hinge
from ualm_nemo.enhance.model import EnhancementVAE
from ualm_nemo.distributed.parallel import launch_layout
from ualm_nemo.enhance.tensorboard import log_examples
from ualm_nemo.model.config import ConfigError
from ualm_nemo import early_signals

log = logging.getLogger(__name__)


def posterior_noise(seed: int, step: int, slots: range, shape: tuple[int, int]) -> torch.Tensor:
    """N(0, 1) noise per sample, a function of (seed, step, global slot) only."""
    out = [torch.randn(shape, generator=torch.Generator().manual_seed(hash((seed, step, k)) & 0x7FFFFFFF))
           for k in slots]
    return torch.stack(out)


class SignalFlag:
    """SIGUSR1 / SIGTERM set a flag; all ranks agree on it at each step end (one tiny all_reduce)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.previous = {signum: signal.signal(signum, self._handler) for signum in early_signals.SIGNALS}

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def _handler(self, signum, frame) -> None:
        self.received = signum

    def agreed(self, device: torch.device) -> bool:
        flag = torch.tensor([0 if self.received is None else 1], dtype=torch.int32, device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


@dataclass
class TrainResult:
    step: int
    losses: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    state: str = ""


def loss_scale_note(w: LossWeights) -> str:
    """What the logged loss numbers are and their usual range (one log line at the start of training)."""
    return (f"enhancer loss: total = {w.stft:g} stft + {w.mel:g} mel + {w.adversarial:g} adversarial + "
            f"{w.feature_matching:g} feature_matching + {w.kl:g} kl. stft and mel are log-magnitude distances "
            "summed over resolutions (7 STFT, 3 mel; mid/side + half left/right), not per-bin errors: ~8-9 and ~5 "
            "at the start (total ~15-17), falling to a floor well above 0 (tiny: total ~7 after 30 steps); "
            "adversarial (hinge) stays near 1, feature_matching below 1; kl grows from ~0.5 to a few as the latent is "
            "used and counts little at its weight. Compare runs by the trend and by evaluate_enhancer.py's LSD, "
            "not by the total's absolute value")


def build_fabric(run: EnhancerRun, size: int, per_node: int, nodes: int) -> Fabric:
    cuda = torch.cuda.is_available()
    return Fabric(accelerator="cuda" if cuda else "cpu", devices=per_node, num_nodes=nodes,
                  strategy="ddp" if size > 1 else "auto", precision="bf16-mixed" if cuda else "32-true",
                  loggers=TensorBoardLogger(run.output_dir, name="tensorboard", version=""))


def training_clips(data: str) -> ClipSet:
    """The usable clips of ``train.data``, every reject logged; a ConfigError naming the key when there are none
    (missing, empty, unreadable as a manifest, or every clip rejected), before any model or process exists."""
    try:
        clips = read_clips(data)
    except FileNotFoundError:
        raise ConfigError(f"train.data={data!r}: no such file or folder") from None
    except Exception as err:  # lhotse's load_manifest: an unknown suffix, bad JSON, not a manifest
        raise ConfigError(f"train.data={data!r}: not a folder of audio files nor a Lhotse recordings / cuts "
                          f"manifest ({type(err).__name__}: {err})") from None
    for where, reason in clips.rejected:
        log.warning("enhancer data: rejected %s: %s", where, reason)
    if not clips.cuts and not clips.rejected:
        raise ConfigError(f"train.data={data!r}: holds no audio ({', '.join(AUDIO_SUFFIXES)} files or manifest "
                          "entries)")
    if not clips.cuts:
        where, reason = clips.rejected[0]
        raise ConfigError(f"train.data={data!r}: no usable clip, all {len(clips.rejected)} rejected (e.g. "
                          f"{where}: {reason})")
    return clips


def train_enhancer(run: EnhancerRun, progress: bool = True) -> TrainResult:
    """Train (or resume from ``<output_dir>/checkpoints``) until ``train.max_steps``."""
    cfg = run.train
    rank, size, per_node, nodes = launch_layout()
    clips = training_clips(cfg.data)  # a signal meanwhile is recorded (early_signals.install) and acted on below
    early_signals.arm(run.output_dir, cfg.max_steps, rank)
    if cfg.global_batch_size % size:
        raise ValueError(f"enhancer.train.global_batch_size={cfg.global_batch_size} is not divisible by "
                         f"{size} processes")
    codec = None
    if cfg.codec_round_trip:
        from ualm_nemo.enhance.codec_round_trip import CodecRoundTrip
        try:
            codec = CodecRoundTrip.from_pretrained(cfg.codec_round_trip)
        except (OSError, ValueError, KeyError) as err:  # no folder, or no / other weights in it: one line
            raise ConfigError(f"train.codec_round_trip={cfg.codec_round_trip!r}: cannot load an X-Codec folder "
                              f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None

    fabric = build_fabric(run, size, per_node, nodes)
    fabric.launch()
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    vae = EnhancementVAE(run.model)
    disc = MultiScaleSTFTDiscriminator(run.model.out_channels, run.loss.discriminator_ffts,
                                       run.loss.discriminator_filters)
    ema = AveragedModel(vae, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
    ema.requires_grad_(False)
    opt_g = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=cfg.disc_lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    vae, opt_g = fabric.setup(vae, opt_g)
    disc, opt_d = fabric.setup(disc, opt_d)
    ema.to(fabric.device)
    loss_fn = GeneratorLoss(run.loss).to(fabric.device)

    root = Path(run.output_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    state = {"vae": vae, "discriminator": disc, "ema": ema, "opt_g": opt_g, "opt_d": opt_d, "step": 0,
             "config": {"model": run.model.to_dict()}}

    def load(path: Path) -> None:
        rest = fabric.load(path, state)
        state["step"] = int(rest.get("step", state["step"])) if rest else state["step"]

    resumed = checkpoints.load_newest(root, load)
    step = int(state["step"])
    if resumed is not None:
        log.info("resuming the enhancer from %s (step %d)", resumed, step)

    def save() -> None:
        state["step"] = step
        tmp = root / f"{checkpoints.name(step)}.ckpt.tmp"
        fabric.save(tmp, state)
        if fabric.is_global_zero:
            checkpoints.publish(tmp, root, step, cfg.keep_last_checkpoints)
        fabric.barrier()

    per_rank = cfg.global_batch_size // size
    slots = range(rank * per_rank, (rank + 1) * per_rank)
    batches = PairBatches(clips, cfg.segment_seconds, cfg.global_batch_size, rank, size, cfg.seed, step)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, num_workers=cfg.num_workers)
    flag = SignalFlag()
    early_signals.disarm()
    log.info("enhancer: training from step %d to max_steps=%d (run state: %s)", step, cfg.max_steps,
             Path(run.output_dir) / early_signals.STATE_FILE)
    log.info(loss_scale_note(run.loss))
    result = TrainResult(step)
    bar = tqdm(total=cfg.max_steps, initial=step, desc="enhancer", unit="step", dynamic_ncols=True,
               disable=not (progress and fabric.is_global_zero))
    last_saved = step if resumed is not None else -1
    batch_iter = iter(loader)
    while step < cfg.max_steps:
        batch = next(batch_iter)
        assert batch["step"] == step, (batch["step"], step)
        inputs, target = batch["input"].to(fabric.device), batch["target"].to(fabric.device)
        if codec is not None:
            inputs = codec(inputs)
        noise = posterior_noise(cfg.seed, step, slots, (run.model.latent_dim, vae.module.latent_frames(
            inputs.shape[-1])))
        out = vae(inputs, noise=noise)
        adversarial = step >= run.loss.adversarial_start_step
        terms_d = {}
        if adversarial:
            d_real, d_fake, _, _ = disc(target, out.audio.detach())
            loss_d = discriminator_hinge(d_real, d_fake)
            opt_d.zero_grad(set_to_none=True)
            fabric.backward(loss_d)
            opt_d.step()
            terms_d["discriminator"] = loss_d.detach()
        total, terms = loss_fn(out.audio, target, out.kl, disc(target, out.audio) if adversarial else None)
        if not torch.isfinite(total):
            values = {k: float(v) for k, v in terms.items()}
            raise FloatingPointError(f"enhancer: non-finite loss at step {step} ({values}); clips {batch['ids']}")
        opt_g.zero_grad(set_to_none=True)
        fabric.backward(total)
        opt_g.step()
        ema.update_parameters(vae.module)
        step += 1
        for reason, count in batch["skipped"].items():
            result.skipped[reason] = result.skipped.get(reason, 0) + count
        if step % cfg.log_every_n_steps == 0 or step == cfg.max_steps:
            values = {k: float(v.detach()) for k, v in {**terms, **terms_d}.items()}
            result.losses = values
            fabric.log_dict({f"train/{k}": v for k, v in values.items()}, step=step)
            fabric.log_dict({f"data/skipped_{k}": v for k, v in result.skipped.items()}, step=step)
            bar.set_postfix(loss=f"{values['total']:.4f}", refresh=False)
        if fabric.is_global_zero and step % cfg.log_audio_every_n_steps == 0:
            log_examples(fabric.logger.experiment, step, inputs[0].float(), out.audio[0].detach().float(),
                         target[0].float())
        bar.update(1)
        if step % cfg.checkpoint_every_n_steps == 0:
            save()
            last_saved = step
        if flag.agreed(fabric.device):
            name = signal.Signals(flag.received).name if flag.received else "a signal on another rank"
            log.info("%s received: saving a checkpoint at step %d and stopping; the next job resumes from it", name,
                     step)
            if last_saved != step:
                save()
                last_saved = step
            result.state = "finished" if step >= cfg.max_steps else "preempted"
            break
    bar.close()
    flag.restore()
    if last_saved != step:
        save()
    result.step = step
    result.state = result.state or "finished"
    if fabric.is_global_zero:
        early_signals.write_run_state(run.output_dir, result.state, step, cfg.max_steps)
    return result
