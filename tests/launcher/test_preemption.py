"""PreemptionCheckpoint on a plain Lightning loop (one CPU process, fast): a real SIGUSR1/SIGTERM mid-run gives one
checkpoint at the next batch end, a stop, and ``state=preempted``; a run that reaches max_steps says ``finished``;
an early stop says ``stopped``. The multi-rank path runs on a real Slurm in test_slurm.py."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from ualm_nemo.training.preemption import PreemptionCheckpoint, read_run_state


class _Tiny(LightningModule):
    def __init__(self, signal_at: int | None = None, signum: int = signal.SIGUSR1) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.signal_at, self.signum = signal_at, signum

    def training_step(self, batch, batch_idx):
        if self.global_step == self.signal_at:
            os.kill(os.getpid(), self.signum)  # what Slurm's --signal=USR1@N (or a preemption) delivers
        return self.layer(batch).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.randn(64, 2), batch_size=2)


class _StopAt(Callback):
    def on_train_batch_end(self, trainer, *args) -> None:
        trainer.should_stop = trainer.global_step >= 2


def _fit(tmp_path, model, max_steps=10, extra=()):
    callback = PreemptionCheckpoint(tmp_path)
    saves = []
    trainer = Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[callback, *extra])
    trainer.save_checkpoint = lambda path, *a, **k: saves.append((trainer.global_step, str(path)))
    before = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        trainer.fit(model)
    except SystemExit:  # Lightning ends a SIGTERM'd run with SIGTERMException after the batch (our save is done)
        pass
    return trainer, saves, before


def test_sigusr1_saves_once_stops_and_records_preempted(tmp_path):
    trainer, saves, before = _fit(tmp_path, _Tiny(signal_at=3))
    assert saves == [(4, str(tmp_path / "checkpoints"))]  # the batch in flight finishes, then one save
    assert trainer.global_step == 4
    assert read_run_state(tmp_path) == {"state": "preempted", "step": "4", "max_steps": "10"}
    assert signal.getsignal(signal.SIGUSR1) == before[signal.SIGUSR1]  # handlers restored


def test_sigterm_saves_before_lightning_exits(tmp_path):
    trainer, saves, _ = _fit(tmp_path, _Tiny(signal_at=2, signum=signal.SIGTERM))
    assert saves == [(3, str(tmp_path / "checkpoints"))]
    assert read_run_state(tmp_path)["state"] == "preempted"


def test_finished_and_stopped_runs(tmp_path):
    _fit(tmp_path / "a", _Tiny(), max_steps=5)
    assert read_run_state(tmp_path / "a") == {"state": "finished", "step": "5", "max_steps": "5"}
    _, saves, _ = _fit(tmp_path / "b", _Tiny(), max_steps=5, extra=[_StopAt()])
    assert read_run_state(tmp_path / "b")["state"] == "stopped" and saves == []


def test_signal_on_the_last_step_counts_as_finished(tmp_path):
    _fit(tmp_path, _Tiny(signal_at=4), max_steps=5)
    assert read_run_state(tmp_path)["state"] == "finished"


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM])
def test_handler_only_sets_a_flag(tmp_path, signum):
    callback = PreemptionCheckpoint(tmp_path)
    callback.setup(None, None, "fit")
    try:
        os.kill(os.getpid(), signum)
        assert callback.received == signum
    finally:
        callback.teardown(None, None, "fit")
