"""Bad configurations fail before any work starts, with the key to change in the message."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ualm_nemo.model.config import AudioInputConfig, BACKBONES, ConfigError, UALMConfig
from ualm_nemo.training.run_config import run_config_from_dict


def _cfg(**parallel) -> UALMConfig:
    return UALMConfig(backbone=BACKBONES["tiny"], audio_in=AudioInputConfig(random_encoder=True)).with_parallel(
        **parallel)


@pytest.mark.parametrize("parallel,world,message", [
    ({"tensor_model_parallel_size": 3}, None, "tensor_model_parallel_size=3 does not divide num_attention_heads"),
    ({"tensor_model_parallel_size": 4}, None, "does not divide the 2 KV groups"),
    ({"pipeline_model_parallel_size": 3}, None, "pipeline_model_parallel_size=3 does not divide num_layers=4"),
    ({"tensor_model_parallel_size": 2}, 3, "world size 3 is not divisible"),
    ({"sequence_parallel": True}, None, "sequence_parallel=true needs tensor_model_parallel_size > 1"),
])
def test_parallel_layout_errors(parallel, world, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(**parallel).validate(world)


def test_valid_layouts_pass():
    _cfg(tensor_model_parallel_size=2, pipeline_model_parallel_size=2).validate(8)
    UALMConfig(backbone=BACKBONES["qwen2.5-7b"], audio_in=AudioInputConfig(enabled=False)).with_parallel(
        tensor_model_parallel_size=4).validate(64)


def test_backbone_shape_errors():
    bad = dataclasses.replace(BACKBONES["tiny"], num_query_groups=3)
    with pytest.raises(ConfigError, match="num_attention_heads=4 is not divisible by num_query_groups=3"):
        UALMConfig(backbone=bad, audio_in=AudioInputConfig(enabled=False)).validate()


def test_a_warmup_longer_than_the_run_is_said(caplog):
    run_config_from_dict({"model": {"audio_in": {"random_encoder": True}}, "train": {"max_steps": 10},
                          "optim": {"warmup_steps": 10}, "data": {"synthesize": True}}).validate(1)
    assert "optim.warmup_steps=10 >= train.max_steps=10: the learning rate never reaches optim.lr" in caplog.text


def test_run_config_rejects_unknown_and_bad_values():
    with pytest.raises(ConfigError, match="unknown key.*model.parallel.tensor_parallel"):
        run_config_from_dict({"model": {"parallel": {"tensor_parallel": 2}}})
    with pytest.raises(ConfigError, match="model.backbone='qwen3'"):
        run_config_from_dict({"model": {"backbone": "qwen3"}})
    tiny = {"audio_in": {"random_encoder": True}}
    with pytest.raises(ConfigError, match="train.stage='rlhf'"):
        run_config_from_dict({"model": tiny, "train": {"stage": "rlhf"}}).validate(1)
    with pytest.raises(ConfigError, match="train.stage=dpo starts from a trained model"):
        run_config_from_dict({"model": tiny, "train": {"stage": "dpo"}}).validate(1)
    with pytest.raises(ConfigError, match="global_batch_size=8 must be divisible by micro_batch_size x data-parallel"):
        run_config_from_dict({"model": tiny, "train": {"global_batch_size": 8, "micro_batch_size": 4}}).validate(4)
    with pytest.raises(ConfigError, match="optim.min_lr"):
        run_config_from_dict({"model": tiny, "optim": {"lr": 1e-4, "min_lr": 1e-3}}).validate(1)


def test_shar_section_is_typed_once_with_its_keys_named():
    """data.shar and data.val_sources become SharLoaderConfig / SourceSpecs when the run config is parsed; every
    problem names its dotted key (the loader, validation, the launcher's plan and checks read the typed form)."""
    from ualm_nemo.data.shar_config import SharLoaderConfig

    source = {"name": "tta", "shar_dir": "/data/shar/tta"}
    run = run_config_from_dict({"data": {"shar": {"sources": [source], "max_tokens": 1024.0, "pack": True,
                                                  "seq_len": 512}, "val_sources": [source]}})
    assert isinstance(run.data.shar, SharLoaderConfig) and run.data.shar.max_tokens == 1024
    assert run.data.shar.sources[0].weight == 1.0 and run.data.val_sources[0].shar_dir == "/data/shar/tta"
    for data, message in (
            ({"shar": {"sources": [source], "max_tokens": "lots"}}, "data.shar.max_tokens='lots' must be a whole"),
            ({"shar": {"sources": [source], "pak": True}}, r"unknown key\(s\) data.shar.pak"),
            ({"shar": {"sources": [source | {"wieght": 2}]}}, r"unknown key\(s\) data.shar.sources.0.wieght"),
            ({"shar": {"sources": [source | {"weight": -1}]}}, r"data.shar.sources.0 \(tta\): weight=-1.0 must be"),
            ({"shar": {"sources": [source, source]}}, "^data.shar.sources names must be unique"),
            ({"shar": {"sources": "tta"}}, "data.shar.sources must be a list"),
            ({"shar": {"sources": [source], "pack": True, "max_tokens": 8}},  # the real key, not data.max_tokens
             r"^data.shar.max_tokens=8 must hold at least one packed row of data.shar.seq_len=4096 \(data.seq_len"),
            ({"shar": {"sources": [source], "weighting": "even"}}, "^data.shar.weighting='even'"),
            ({"val_sources": [{"name": "v"}]}, "data.val_sources.0.shar_dir must be set")):
        with pytest.raises(ConfigError, match=message):
            run_config_from_dict({"data": data})
    with pytest.raises(ConfigError, match="^data.val_sources names must be unique"):
        run_config_from_dict({"model": {"audio_in": {"random_encoder": True}}, "data": {
            "shar": {"sources": [source]}, "val_sources": [source, source]}}).validate()


def test_backbone_overrides_from_a_base():
    cfg = run_config_from_dict({"model": {"backbone": {"base": "tiny", "num_layers": 2}}})
    assert cfg.model.backbone.num_layers == 2 and cfg.model.backbone.hidden_size == 64


def test_train_fails_before_training_on_a_bad_layout(tmp_path):
    """The entry point validates against the world size before any process group or model exists."""
    from ualm_nemo.training.train import train

    with pytest.raises(ConfigError, match="pipeline_model_parallel_size=3"):
        train({"model": {"parallel": {"pipeline_model_parallel_size": 3}}, "output_dir": str(tmp_path)})
    assert not any(tmp_path.iterdir())  # nothing was written


def test_readme_overrides_work_as_written():
    """`train.stop_at_step=N`, `train.init_from=...` and the post-training manifests (README, launcher README)
    need no `+`: the keys are in conf/."""
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    conf = Path(__file__).resolve().parents[2] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base=None):
        cfg = compose("train", overrides=["train.stop_at_step=6", "train.init_from=/ckpt/ualm-init"])
        sft = compose("train", overrides=["stage=sft", "data.sft_manifest=/d/sft.jsonl", "train.init_from=/c"])
        dpo = compose("train", overrides=["stage=dpo", "data.dpo_manifest=/d/pairs.jsonl", "train.init_from=/c",
                                          "dpo.reference_logps=/r.json", "dpo.reference_checkpoint=/c"])
    run = run_config_from_dict(OmegaConf.to_container(cfg, resolve=True))
    assert run.train.stop_at_step == 6 and run.train.init_from == "/ckpt/ualm-init"
    assert run_config_from_dict(OmegaConf.to_container(sft, resolve=True)).data.sft_manifest == "/d/sft.jsonl"
    run = run_config_from_dict(OmegaConf.to_container(dpo, resolve=True))
    run.validate(1)
    assert run.data.dpo_manifest == "/d/pairs.jsonl" and run.dpo.reference_logps == "/r.json"


@pytest.mark.parametrize("stage,max_steps,lr,weight_decay,cfg_dropout", [
    ("pretrain", 660000, 1e-4, 0.1, 0.05), ("align", 1800, 1e-4, 0.1, 0.05), ("sft", 4000, 2e-5, 0.1, 0.05),
    ("dpo", 1000, 5e-7, 0.0, 0.0)])
def test_a_stage_config_sets_its_own_schedule(stage, max_steps, lr, weight_decay, cfg_dropout):
    """conf/stage/*.yaml win over conf/train.yaml's base values and over the data group (a DPO run on the demo
    data group used to train at the pre-training lr with CFG dropout on); the command line wins over both."""
    cfg = _composed(f"stage={stage}")
    assert (cfg["train"]["max_steps"], cfg["optim"]["lr"], cfg["optim"]["weight_decay"]) == (max_steps, lr,
                                                                                              weight_decay)
    assert cfg["data"]["cfg_dropout"] == cfg_dropout and cfg["data"]["synthesize"] is (stage not in ("sft", "dpo"))
    assert _composed(f"stage={stage}", "optim.lr=0.5", "data.cfg_dropout=0.2")["optim"]["lr"] == 0.5
    assert _composed(f"stage={stage}", "data.cfg_dropout=0.2")["data"]["cfg_dropout"] == 0.2


BAD_NUMBERS = [  # (command-line override, the message's start): each typed as a user would, parsed by Hydra
    ("train.max_steps=abc", "train.max_steps='abc' must be a whole number"),
    ("optim.lr=fast", "optim.lr='fast' must be a number"),
    ("optim.lr=nan", "optim.lr=nan must be a finite number"),
    ("optim.lr=0", "optim.lr=0.0 must be positive"),
    ("train.micro_batch_size=2.5", "train.micro_batch_size=2.5 must be a whole number"),
    ("train.global_batch_size=-8", "train.global_batch_size=-8 must be at least 1"),
    ("train.log_every_n_steps=0", "train.log_every_n_steps=0 must be at least 1"),
    ("train.checkpoint_every_n_steps=0", "train.checkpoint_every_n_steps=0 must be at least 1"),
    ("train.stop_at_step=-1", "train.stop_at_step=-1 must be at least 1"),
    ("data.seq_len=0", "data.seq_len=0 must be at least 1"),
    ("data.synthesize=maybe", "data.synthesize='maybe' must be true or false"),
    ("model.params_dtype=fp64", "model.params_dtype='fp64': choose one of 'fp32', 'bf16'"),
    ("optim.betas=[0.9,1.5]", "optim.betas=[0.9, 1.5] must be two numbers in [0, 1)"),
]


def _composed(*overrides: str) -> dict:
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[2] / "conf"), version_base=None):
        return OmegaConf.to_container(compose("train", overrides=list(overrides)), resolve=True)


@pytest.mark.parametrize("override,message", BAD_NUMBERS)
def test_every_cli_number_is_checked_before_work(override, message, tmp_path):
    from ualm_nemo.training.train import train

    cfg = _composed(override, f"output_dir={tmp_path / 'run'}")
    with pytest.raises(ConfigError) as err:
        train(cfg)
    assert str(err.value).startswith(message), str(err.value)
    assert not (tmp_path / "run").exists()  # nothing was written


def test_whole_floats_are_accepted_as_ints():
    cfg = run_config_from_dict(_composed("train.micro_batch_size=4.0", "optim.lr=1"))
    assert cfg.train.micro_batch_size == 4 and isinstance(cfg.train.micro_batch_size, int)
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)


def test_train_command_prints_one_line_for_a_bad_number(tmp_path):
    """One line names the key; the refused launch leaves no Hydra run folder (nor the output_dir Hydra made for
    it); megatron's and torch's notes about the missing TE / Apex / CUDA are one line, not ten."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    (tmp_path / "cwd").mkdir()
    done = subprocess.run([sys.executable, str(root / "examples" / "train.py"), "train.max_steps=abc",
                           f"output_dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path / "cwd", env={**os.environ, "PYTHONPATH": str(root)})
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == "train.py: error: train.max_steps='abc' must be a whole number"
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "run").exists()  # the refused launch's Hydra run folder is removed, and its parents
    assert not any((tmp_path / "cwd").iterdir())  # nothing written where the command was started
    from ualm_nemo.compat.quiet_logs import FALLBACK_NOTE

    if not torch.cuda.is_available():
        assert done.stderr.count(FALLBACK_NOTE) == 1, done.stderr
    assert "Transformer Engine and Apex are not installed" not in done.stderr
    assert "CUDA_HOME" not in done.stderr


def test_missing_manifest_and_unwritable_output_dir_are_named(tmp_path):
    from ualm_nemo.training.train import train

    (tmp_path / "a_file").write_text("x")
    cases = [({"data": {"synthesize": False, "tta_manifest": str(tmp_path / "nope.jsonl")}},
              f"data.tta_manifest='{tmp_path / 'nope.jsonl'}': no such file"),
             ({"output_dir": str(tmp_path / "a_file" / "run")},
              f"output_dir='{tmp_path / 'a_file' / 'run'}' cannot be created: {tmp_path / 'a_file'} is a file, not a folder")]
    for override, message in cases:
        cfg = _composed(f"output_dir={tmp_path / 'run'}")
        for section, values in override.items():
            cfg[section] = {**cfg[section], **values} if isinstance(values, dict) else values
        with pytest.raises(ConfigError) as err:
            train(cfg)
        assert str(err.value) == message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_prepare_names_a_missing_manifest(tmp_path, monkeypatch, capsys):
    from ualm_nemo.testing.examples import load_example

    monkeypatch.setattr("sys.argv", ["prepare_data.py", "--out", str(tmp_path / "p"), "--source",
                                     f"a=tta:{tmp_path / 'nope.jsonl'}"])
    with pytest.raises(SystemExit) as done:
        load_example("prepare_data").main()
    assert done.value.code == 2 and f"manifest(s) not found: {tmp_path / 'nope.jsonl'}" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_no_silent_random_audio_encoder_in_production_configs():
    """A real backbone's config demands model.audio_in.encoder_path only while audio input is on; the tiny random
    tower is asked for by name (conf/model/tiny.yaml), never a fallback."""
    base = ["model=qwen2.5-7b", "data.synthesize=true"]
    with pytest.raises(ConfigError, match=r"model.audio_in.encoder_path is not set.*enabled=false.*random_encoder"):
        run_config_from_dict(_composed(*base)).validate(4)
    run = run_config_from_dict(_composed(*base, "model.audio_in.enabled=false")).validate(4)
    assert run.model.audio_in.encoder_path is None and not run.model.audio_in.random_encoder
    run = run_config_from_dict(_composed(*base, "model.audio_in.encoder_path=/models/omni")).validate(4)
    assert run.model.audio_in.encoder_path == "/models/omni"
    with pytest.raises(ConfigError, match="random_encoder=true and encoder_path are both set"):
        run_config_from_dict(_composed("model.audio_in.encoder_path=/models/omni")).validate(1)
    assert run_config_from_dict(_composed()).validate(1).model.audio_in.random_encoder  # model=tiny: said in conf/
    from ualm_nemo.model.audio_input import build_audio_encoder

    with pytest.raises(ConfigError, match="model.audio_in.encoder_path is not set"):
        build_audio_encoder(AudioInputConfig())



def _messages_as(uid: int | None, cfgs: list[dict]) -> list[str]:
    """train(cfg)'s ConfigError message for each config, in a forked child that runs as ``uid`` (None: as is)."""
    import json
    import os

    from ualm_nemo.training.train import train  # imported before the fork: the child may not read /root

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: give up root for good, try each config, report, leave without cleanup
        try:
            os.close(read)
            if uid is not None:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
            messages = []
            for cfg in cfgs:
                try:
                    train(cfg)
                    messages.append("trained")
                except ConfigError as e:
                    messages.append(str(e))
                except BaseException as e:  # a raw error is what the test is there to catch
                    messages.append(f"{type(e).__name__}: {e}")
            os.write(write, json.dumps(messages).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        out = f.read()
    os.waitpid(pid, 0)
    return json.loads(out)


def test_output_dir_without_permission_is_named_before_work():
    """Folders the run may not write into, or not even look inside: one message naming output_dir and the folder.
    Root may write anywhere, so as root the check runs in a child that has become user nobody (a real permission
    denial, no stand-in); as any other user, as that user."""
    import os
    import shutil
    import tempfile
    from pathlib import Path

    base = Path(tempfile.mkdtemp(prefix="ualm_perm_"))  # not under pytest's tmp_path: that is private to root
    try:
        (base / "locked").mkdir()
        (base / "private").mkdir()
        base.chmod(0o755)
        (base / "locked").chmod(0o555)  # may look inside, may not write
        (base / "private").chmod(0o000 if os.geteuid() else 0o700)  # may not look inside (root's, for nobody)
        cfgs = [_composed(f"output_dir={base / name / 'run'}") for name in ("locked", "private")]
        assert _messages_as(65534 if os.geteuid() == 0 else None, cfgs) == [
            f"output_dir='{base / 'locked' / 'run'}' cannot be written: no write permission on {base / 'locked'}",
            f"output_dir='{base / 'private' / 'run'}' cannot be created: no permission to look inside "
            f"{base / 'private'}"]
        assert not (base / "locked" / "run").exists()
    finally:
        (base / "private").chmod(0o700)
        shutil.rmtree(base, ignore_errors=True)
