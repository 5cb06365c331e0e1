"""`python -m launcher.submit`: invalid stages are rejected before anything is written, each error naming the
key or flag to change; dry runs print the script (or the local command) and submit nothing."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from launcher.cluster import ClusterConfig, load_cluster
from launcher.submit import main, prepare
from launcher.validate import hydra_value
from ualm_nemo.config_types import ConfigErrors
from ualm_nemo.model.config import ConfigError

TINY = ["optim.warmup_steps=2", "train.global_batch_size=4",
        "train.micro_batch_size=2", "+data.synthetic_samples_per_task=4"]


def _argv(tmp_path, *flags: str, overrides=TINY) -> list[str]:
    return ["--cluster", "local", "--output-dir", str(tmp_path / "run"), *flags, "--", *overrides]


@pytest.mark.parametrize("flags,overrides,match", [
    # parallel sizes against the model and the allocation
    ([], ["model.parallel.tensor_model_parallel_size=3"], "tensor_model_parallel_size=3"),
    (["--tasks-per-node", "4"], ["model.parallel.pipeline_model_parallel_size=3"], "pipeline_model_parallel_size=3"),
    (["--tasks-per-node", "1", "--nodes", "2"], ["model.parallel.tensor_model_parallel_size=2"],
     "tensor parallelism stays inside a node"),
    # GPU features that cannot run as asked (FP8 / CP without Transformer Engine's layers, VPP without PP)
    ([], ["model.fp8.enabled=true"], "model.fp8.enabled=true runs the decoder's GEMMs in Transformer Engine"),
    ([], ["model.parallel.context_parallel_size=2"], "context_parallel_size=2 needs Transformer Engine"),
    ([], ["model.parallel.virtual_pipeline_model_parallel_size=2"], "needs model.parallel.pipeline_model_parallel"),
    (["--tasks-per-node", "2"], ["model.parallel.pipeline_model_parallel_size=2",
                                 "model.parallel.virtual_pipeline_model_parallel_size=2", "train.micro_batch_size=4"],
     r"micro-batches of each step.*= 1, to be a multiple of pipeline_model_parallel_size=2"),
    # batch arithmetic
    ([], ["train.global_batch_size=6", "train.micro_batch_size=2"], r"micro_batch_size x data-parallel size"),
    ([], ["train.global_batch_size=5", "train.micro_batch_size=2"], "not a multiple of train.micro_batch_size"),
    # paths and data
    ([], ["data.tokenizer=/nonexistent/qwen"], r"data.tokenizer='/nonexistent/qwen': no such tokenizer folder"),
    ([], ["data.synthesize=false"], "no training data"),
    ([], ["data=manifests"], r"Missing mandatory value.*give it on the command line"),
    # evaluation during training: the eval set and metric models checked through the mounts, by key
    ([], ["train.eval_every_n_steps=2"], "train.eval_every_n_steps=2 needs an eval set"),
    ([], ["train.eval_every_n_steps=2", "eval.tta_set=/nonexistent/tta.jsonl", "eval.clap=/nonexistent/clap.pt",
          "eval.clap_tokenizer=/nonexistent/roberta"], r"eval.clap='/nonexistent/clap.pt': no such checkpoint file"),
    # Hydra: typos and syntax
    ([], ["train.max_step=3"], r"max_step.*add it with '\+key=value'"),
    ([], ["train.max_steps=[1"], "invalid Hydra override"),
    ([], ["model=nonexistent"], "does not compose"),
    ([], ["train.max_steps=0"], r"train.max_steps=0 must be at least 1"),
    # the cluster side
    (["--time", "1:2:3:4"], [], "--time='1:2:3:4'"),
    (["--time", "1", "--signal-seconds", "90"], [], "--signal-seconds=90 must lie between"),
    (["--job-name", "bash"], [], "interactive session"),
    (["--env", "1BAD=x"], [], "--env '1BAD'"),
    (["--env", "NOVALUE"], [], "give KEY=VALUE"),
    (["--sbatch-arg=--time=10"], [], "launcher's own flag"),
    (["--sbatch-arg=--qos=a\nb"], [], "one long option on one line"),
    (["--container-mounts", "/a:/b"], [], "needs --container-image"),
    (["--gpus-per-node", "8", "--tasks-per-node", "4"], [], "one task per GPU"),
    (["--cluster", "nope"], [], "no such preset; known: .*local"),
])
def test_invalid_stage_is_rejected_with_the_key_to_fix(tmp_path, capsys, flags, overrides, match):
    with pytest.raises(ConfigError, match=match):
        prepare(_argv(tmp_path, *flags, overrides=[*TINY, *overrides]))
    assert main(_argv(tmp_path, *flags, overrides=[*TINY, *overrides])) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert not (tmp_path / "run").exists()  # nothing written


@pytest.mark.parametrize("output_dir,match", [("/tmp/a\nb", "one line"), ("/tmp/${oc.env:HOME}", "verbatim"),
                                              ("/tmp/50%", "file-name pattern"), ("/tmp/a\\b", "file-name pattern")])
def test_unrepresentable_output_dirs_are_rejected(tmp_path, output_dir, match):
    with pytest.raises(ConfigError, match=match):
        prepare(["--cluster", "local", "--output-dir", output_dir, "--", *TINY])


def test_dry_run_prints_the_script_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run dir; $(touch pwned) 'q'"
    assert main(["--cluster", "local", "--job-name", 'my "job" $(x)', "--output-dir", str(out), "--dry-run", "--",
                 *TINY, "train.max_steps=7"]) == 0
    script = capsys.readouterr().out
    assert script.startswith("#!/bin/bash\n") and '#SBATCH --job-name="my \\"job\\" $(x)"' in script
    assert "train.max_steps=7" in script and "scontrol requeue" in script
    assert hydra_value("output_dir", str(out)) in [part.strip(" \\") for part in script.splitlines()] or \
        "output_dir=" in script
    assert not out.exists() and not (tmp_path / "pwned").exists()


def test_local_dry_run_prints_the_command(tmp_path, capsys):
    assert main(["--cluster", "local", "--local", "--dry-run", "--output-dir", str(tmp_path / "r"), "--",
                 *TINY]) == 0
    out = capsys.readouterr().out
    assert "would run locally:" in out and "torch.distributed.run" in out and "--nproc_per_node=2" in out


def test_presets_load_and_flags_override():
    dgx = load_cluster("dgx-h100", {"nodes": 4, "account": "proj"})
    assert (dgx.nodes, dgx.gpus_per_node, dgx.ntasks_per_node, dgx.world_size) == (4, 8, 8, 32)
    assert dgx.account == "proj" and dgx.python_exe == "python" and dgx.container_image
    assert dgx.mount_to_host("/lustre/data/x.json") == "/lustre/data/x.json"
    mapped = ClusterConfig(container_image="i", container_mounts=["/host/data:/data:ro"]).validate()
    assert mapped.mount_to_host("/data/x.json") == "/host/data/x.json"
    assert mapped.mount_to_host("/database") == "/database"
    assert [ClusterConfig(time=t).time_seconds() for t in ("30", "1:30", "1:00:00", "1-0", "1-1:1", "1-0:0:5")] == [
        1800, 90, 3600, 86400, 90060, 86405]


def test_paths_are_checked_through_container_mounts(tmp_path):
    host = tmp_path / "host"
    host.mkdir()
    (host / "text.jsonl").write_text("")
    flags = ["--container-image", "img", "--container-mounts", f"{host}:/data", "--python", "python"]
    manifests = [*TINY, "data=manifests", "data.tokenizer=byte", "data.codec_path=null"]
    prepare(_argv(tmp_path, *flags, overrides=[*manifests, "data.text_manifest=/data/text.jsonl"]))
    with pytest.raises(ConfigError, match="data.text_manifest='/data/nope.jsonl'.*container mounts"):
        prepare(_argv(tmp_path, *flags, overrides=[*manifests, "data.text_manifest=/data/nope.jsonl"]))


def test_submit_without_cluster_states_the_gpus_per_node_it_assumes(tmp_path, caplog):
    base = ["--output-dir", str(tmp_path / "run"), "--nodes", "1", "--dry-run", "--", "train.global_batch_size=8",
            "train.micro_batch_size=1", "+data.synthetic_samples_per_task=4"]
    job = prepare(base)
    assert job.cluster.gpus_per_node == 8
    assert "no --cluster and no --gpus-per-node: assuming 8 GPUs per node" in caplog.text
    caplog.clear()
    prepare(["--gpus-per-node", "8", *base])
    assert "assuming" not in caplog.text


def _blend(dirs: list[str]) -> list[str]:
    return [*TINY[:-1], "data=pretrain_blend", "data.tokenizer=byte",
            *(f"data.shar.sources.{i}.shar_dir={d}" for i, d in enumerate(dirs))]


def test_a_shar_blend_is_checked_source_by_source_through_container_mounts(tmp_path, demo_shar):
    """data=pretrain_blend: every source's shards/ folder (mapped through the mounts) and its task, the weights,
    the tokenizer; an accepted blend is written into the script."""
    host = Path(demo_shar["tta"]).parent  # .../shar on this host is /data/shar in the container
    flags = ["--container-image", "img", "--container-mounts", f"{host}:/data/shar", "--python", "python"]
    dirs = ["/data/shar/understanding", "/data/shar/tta", "/data/shar/text"]
    job = prepare(_argv(tmp_path, *flags, overrides=_blend(dirs)))
    assert all(f"data.shar.sources.{i}.shar_dir={d}" in job.text for i, d in enumerate(dirs))
    cases = [
        (_blend([dirs[0], "/data/shar/nope", dirs[2]]),
         r"data.shar.sources\[1\] \(generation\): shar_dir='/data/shar/nope' \(on this host: .*/nope\) has no "
         r"shards/ folder.*container mounts mapped"),
        (_blend(["/elsewhere/understanding", *dirs[1:]]), r"sources\[0\] \(understanding\).*no shards/ folder"),
        ([*_blend(dirs), "data.shar.sources.1.weight=0"], r"data.shar.sources.1 \(generation\): weight=0.0 must be > 0"),
        ([*_blend(dirs), "data.tokenizer=/data/qwen"], r"data.tokenizer='/data/qwen': no such tokenizer folder"),
        ([*TINY[:-1], "data=pretrain_blend"], r"Missing mandatory value.*give it on the command line"),
        ([*_blend(dirs), "+data.tta_manifest=/data/x.jsonl"], "data.shar replaces data.synthesize and the data"),
    ]
    for overrides, match in cases:
        with pytest.raises(ConfigError, match=match):
            prepare(_argv(tmp_path, *flags, overrides=overrides))


def test_post_training_stages_submit_with_their_own_data(tmp_path, demo_shar):
    """stage=sft / dpo read data.sft_manifest / dpo_manifest (or Shar) and train.init_from: all checked here."""
    (tmp_path / "sft.jsonl").write_text("")
    (tmp_path / "init").mkdir()
    (tmp_path / "init" / "latest").write_text("")  # an empty folder is refused (test_empty_model_folders_...)
    sft = ["train.global_batch_size=4", "train.micro_batch_size=2", "stage=sft",
           f"data.sft_manifest={tmp_path / 'sft.jsonl'}"]
    prepare(_argv(tmp_path, overrides=[*sft, f"train.init_from={tmp_path / 'init'}"]))
    with pytest.raises(ConfigError, match=r"train.init_from='.*/nope': no such initial weights folder"):
        prepare(_argv(tmp_path, overrides=[*sft, f"train.init_from={tmp_path / 'nope'}"]))
    with pytest.raises(ConfigError, match=r"sources\[0\] \(tta\) holds 'tta' cuts: train.stage=dpo loads "
                                          "preference pairs"):
        prepare(_argv(tmp_path, overrides=[
            "train.global_batch_size=4", "train.micro_batch_size=2", "stage=dpo", "data=shar", "data.tokenizer=byte",
            "dpo.reference=online", f"dpo.reference_checkpoint={tmp_path / 'init'}",
            f"train.init_from={tmp_path / 'init'}", f"data.shar.sources.0.shar_dir={demo_shar['tta']}",
            "data.shar.pack=false"]))


def test_fp8_without_transformer_engine_is_refused_unless_a_container_brings_it(tmp_path, monkeypatch):
    """The host's TE is checked only when the job runs in the host's environment (no --container-image)."""
    monkeypatch.setitem(sys.modules, "transformer_engine", None)  # not importable, whatever this host has
    fp8 = [*TINY, "model.parallel.transformer_impl=transformer_engine", "model.attention_backend=megatron",
           "model.params_dtype=bf16", "model.fp8.enabled=true"]  # model=tiny's sdpa default is the local spec's
    with pytest.raises(ConfigError, match=r"model.fp8.enabled=true needs Transformer Engine.*--container-image"):
        prepare(_argv(tmp_path, overrides=fp8))
    prepare(_argv(tmp_path, "--container-image", "img", "--python", "python", overrides=fp8))
    assert not (tmp_path / "run").exists()


def test_every_problem_is_listed_in_one_error(tmp_path, capsys):
    """A command with four bad paths and a bad layout: one run, one error, all five named (not one per rerun)."""
    bad = ["data.tokenizer=/nonexistent/qwen", "model.audio_in.random_encoder=false",
           "model.audio_in.encoder_path=/nonexistent/omni",
           "train.init_from=/nonexistent/init", "data.val_tta_manifest=/nonexistent/val.jsonl",
           "model.parallel.tensor_model_parallel_size=3"]
    with pytest.raises(ConfigErrors) as err:
        prepare(_argv(tmp_path, overrides=[*TINY, *bad]))
    problems = err.value.problems
    assert len(problems) == 5 and str(err.value).startswith("5 problems:")
    for key in ("data.tokenizer='/nonexistent/qwen'", "model.audio_in.encoder_path='/nonexistent/omni'",
                "train.init_from='/nonexistent/init'", "data.val_tta_manifest='/nonexistent/val.jsonl'",
                "tensor_model_parallel_size=3"):
        assert sum(key in p for p in problems) == 1, (key, problems)
    assert isinstance(err.value, ConfigError)  # callers catching ConfigError keep working
    assert main(_argv(tmp_path, overrides=[*TINY, *bad])) == 2
    assert capsys.readouterr().err.startswith("error: 5 problems:\n  - ")
    assert not (tmp_path / "run").exists()


def test_empty_model_folders_are_refused(tmp_path):
    folders = {key: tmp_path / key for key in ("tokenizer", "encoder", "init")}
    for folder in folders.values():
        folder.mkdir()
    with pytest.raises(ConfigErrors) as err:
        prepare(_argv(tmp_path, overrides=[*TINY, f"data.tokenizer={folders['tokenizer']}",
                                           "model.audio_in.random_encoder=false",
                                           f"model.audio_in.encoder_path={folders['encoder']}",
                                           f"train.init_from={folders['init']}"]))
    problems = err.value.problems
    assert [p.split("=")[0] for p in problems] == ["data.tokenizer", "model.audio_in.encoder_path", "train.init_from"]
    assert all("is empty" in p for p in problems)


def test_dropped_output_dir_override_is_said(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="launcher"):
        job = prepare(_argv(tmp_path, "--dry-run", overrides=[*TINY, f"output_dir={tmp_path / 'mine'}"]))
    assert job.output_dir == str(tmp_path / "run")
    assert f"the override output_dir={tmp_path / 'mine'} is dropped: --output-dir={tmp_path / 'run'}" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="launcher"):
        prepare(_argv(tmp_path, "--dry-run"))
    assert "is dropped" not in caplog.text


def test_training_start_check_lists_data_and_output_dir_problems(tmp_path):
    """run_config.check_local_paths (what each rank runs before training) lists its problems together too."""
    from launcher.validate import compose_run
    from ualm_nemo.training.run_config import check_local_paths, run_config_from_dict

    (tmp_path / "file").write_text("")
    run = run_config_from_dict(compose_run([*TINY, f"output_dir={tmp_path / 'file' / 'run'}",
                                            f"data.val_tta_manifest={tmp_path / 'val.jsonl'}"]))
    with pytest.raises(ConfigErrors) as err:
        check_local_paths(run)
    assert len(err.value.problems) == 2
    assert "data.val_tta_manifest=" in err.value.problems[0] and "is a file, not a folder" in err.value.problems[1]
