"""GPU training features as config (model.recompute, model.fp8, model.parallel.*): each bad value is refused with
its key before work starts; good ones map onto megatron's TransformerConfig fields. What the CPU can run is
proved equal to the plain run in tests/distributed/test_training_features.py."""

from __future__ import annotations

import sys
import types

import pytest

from ualm_nemo.model.config import ConfigError, UALMConfig
from ualm_nemo.training.run_config import run_config_from_dict

TE = {"parallel": {"transformer_impl": "transformer_engine"}, "params_dtype": "bf16"}


def _model(**section):
    return UALMConfig.from_dict({"audio_in": {"random_encoder": True}, **section})


@pytest.mark.parametrize("section,world,message", [
    # recompute
    ({"recompute": {"granularity": "some"}}, None, r"model.recompute.granularity='some': choose one of"),
    ({"recompute": {"granularity": "selective", "num_layers": 1}}, None,
     r"model.recompute.method / num_layers choose the layers of granularity=full"),
    ({"recompute": {"method": "uniform"}}, None, r"with granularity=None set both to null"),
    ({"recompute": {"granularity": "full", "num_layers": 5}}, None, r"model.recompute.num_layers=5 must lie in \[1, 4\]"),
    ({"recompute": {"granularity": "full", "num_layers": 3}, "parallel": {"pipeline_model_parallel_size": 2}}, None,
     r"model.recompute.num_layers=3 must lie in \[1, 2\]"),
    ({"recompute": {"granularity": "selective", "modules": ["layernorm"]}}, None,
     r"model.recompute.modules=\['layernorm'\]: choose from \['core_attn', 'mlp'\]"),
    # fp8
    ({"fp8": {"enabled": True}}, None, "model.fp8.enabled=true runs the decoder's GEMMs in Transformer Engine"),
    ({"fp8": {"enabled": True}, "parallel": {"transformer_impl": "transformer_engine"}}, None,
     "model.fp8.enabled=true needs model.params_dtype=bf16"),
    ({"fp8": {"enabled": True, "recipe": "mx"}, **TE}, None, r"model.fp8.recipe='mx': choose one of"),
    ({"fp8": {"enabled": True, "format": "e5m2"}, **TE}, None, r"model.fp8.format='e5m2': choose one of"),
    ({"fp8": {"enabled": True, "amax_history_len": 0}, **TE}, None, "model.fp8.amax_history_len=0 >= 1"),
    ({"fp8": {"enabled": True, "bf16_layers_at_ends": 1}, **TE}, None,
     "model.fp8.bf16_layers_at_ends needs a current-scaling recipe"),
    ({"fp8": {"enabled": True, "recipe": "tensorwise", "bf16_layers_at_ends": 5}, **TE}, None,
     r"model.fp8.bf16_layers_at_ends=5 must lie in \[0, 4\]"),
    ({"fp8": {"enabled": True}, **TE, "backbone": {"base": "tiny", "hidden_size": 72, "ffn_hidden_size": 176}}, None,
     "FP8 GEMMs need dimensions divisible by 16, model.backbone.hidden_size=72"),
    # context parallel, virtual pipeline, overlap, bf16 grad reduction
    ({"parallel": {"context_parallel_size": 0}}, None, "model.parallel.context_parallel_size=0 must be >= 1"),
    ({"parallel": {"context_parallel_size": 2}}, None,
     "context_parallel_size=2 needs Transformer Engine's attention.*transformer_impl=transformer_engine"),
    ({"parallel": {"context_parallel_size": 2, "transformer_impl": "transformer_engine"}}, 5,
     "world size 5 is not divisible by tensor x pipeline x context parallel = 2"),
    ({"parallel": {"virtual_pipeline_model_parallel_size": 2}}, None,
     "virtual_pipeline_model_parallel_size=2 interleaves.*pipeline_model_parallel_size > 1"),
    ({"parallel": {"virtual_pipeline_model_parallel_size": 1, "pipeline_model_parallel_size": 2}}, None,
     r"virtual_pipeline_model_parallel_size=1 must be >= 2 \(or null\)"),
    ({"parallel": {"virtual_pipeline_model_parallel_size": 4, "pipeline_model_parallel_size": 2}}, None,
     "virtual_pipeline_model_parallel_size=4 x pipeline_model_parallel_size=2 does not divide num_layers=4"),
    ({"parallel": {"overlap_param_gather": True, "overlap_grad_reduce": True, "use_distributed_optimizer": False}},
     None, "overlap_param_gather=true .*needs model.parallel.use_distributed_optimizer=true"),
    ({"parallel": {"overlap_param_gather": True}}, None, "needs model.parallel.overlap_grad_reduce=true"),
    ({"parallel": {"grad_reduce_in_bf16": True}}, None, "grad_reduce_in_bf16=true .*needs model.params_dtype=bf16"),
    ({"parallel": {"overlap_grad_reduce": "yes"}}, None, "model.parallel.overlap_grad_reduce='yes' must be true"),
    ({"fp8": {"enable": True}}, None, r"unknown key\(s\) model.fp8.enable"),
])
def test_bad_features_name_their_key(section, world, message):
    with pytest.raises(ConfigError, match=message):
        _model(**section).validate(world)


def _run(model: dict, data: dict | None = None, world: int | None = None, **train):
    return run_config_from_dict({"model": {"audio_in": {"random_encoder": True}, **model},
                                 "data": {"synthesize": True, **(data or {})}, "train": train}).validate(world)


def test_context_parallel_divides_the_sequence_and_shrinks_data_parallel():
    cp2 = {"parallel": {"context_parallel_size": 2, "transformer_impl": "transformer_engine"}}
    with pytest.raises(ConfigError, match=r"data.seq_len=4098 must be divisible by 2 x model.parallel.context_"
                                          r"parallel_size = 4"):
        _run(cp2, {"seq_len": 4098})
    with pytest.raises(ConfigError, match=r"data.shar.seq_len=1026 must be divisible by 2 x"):
        run_config_from_dict({"model": {"audio_in": {"random_encoder": True}, **cp2},
                              "data": {"shar": {"sources": [{"name": "a", "shar_dir": "/a"}],
                                                 "seq_len": 1026}}}).validate()
    # world 8 at CP2 is DP 4: a global batch of 8 in micro-batches of 4 does not split over 4 ranks
    with pytest.raises(ConfigError, match=r"micro_batch_size x data-parallel size = 4 x 4"):
        _run(cp2, world=8, global_batch_size=8, micro_batch_size=4)
    _run(cp2, world=8, global_batch_size=8, micro_batch_size=2)
    assert _model(**cp2).parallel.data_parallel_size(8) == 4


VPP2 = {"parallel": {"pipeline_model_parallel_size": 2, "virtual_pipeline_model_parallel_size": 2}}


def test_virtual_pipeline_needs_micro_batches_in_multiples_of_pp():
    """Megatron's interleaved schedule runs micro-batches in groups of PP: a step's count (global / (micro x DP))
    and train.val_batches must be multiples of PP, said with the keys before any process group exists."""
    with pytest.raises(ConfigError, match=r"virtual_pipeline_model_parallel_size=2 needs the micro-batches of each "
                                          r"step, train.global_batch_size=12 / \(train.micro_batch_size=4\) = 3, "
                                          r"to be a multiple of pipeline_model_parallel_size=2"):
        _run(VPP2, global_batch_size=12, micro_batch_size=4)
    # world 4 at PP2 is DP 2: 8 / (2 x 2) = 2 micro-batches per rank pass, 8 / (4 x 2) = 1 does not
    _run(VPP2, world=4, global_batch_size=8, micro_batch_size=2)
    with pytest.raises(ConfigError, match=r"= 1, to be a multiple of pipeline_model_parallel_size=2"):
        _run(VPP2, world=4, global_batch_size=8, micro_batch_size=4)
    with pytest.raises(ConfigError, match=r"train.val_batches=3 must be a multiple of model.parallel.pipeline_model_"
                                          r"parallel_size=2 with virtual_pipeline_model_parallel_size set"):
        _run(VPP2, global_batch_size=8, micro_batch_size=4, val_every_n_steps=2, val_batches=3)
    _run({"parallel": {"pipeline_model_parallel_size": 2}}, global_batch_size=12, micro_batch_size=4)  # no VPP: 1F1B
    # full recompute counts the layers of one chunk (4 layers / (PP2 x VPP2) = 1)
    with pytest.raises(ConfigError, match=r"model.recompute.num_layers=2 must lie in \[1, 1\] \(the layers of one "
                                          r"model chunk"):
        _model(**VPP2, recompute={"granularity": "full", "method": "block", "num_layers": 2}).validate()


def test_readme_interleaved_pipeline_command_validates():
    """The README's VPP example (TP2 x PP4 x VPP7 on 8 GPUs) is a valid run; without its batch keys it is
    refused naming them."""
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    layout = ["model=qwen2.5-7b", "model.audio_in.encoder_path=/models/encoder",
              "model.parallel.tensor_model_parallel_size=2", "model.parallel.pipeline_model_parallel_size=4",
              "model.parallel.virtual_pipeline_model_parallel_size=7"]
    batch = ["train.global_batch_size=16", "train.micro_batch_size=2"]
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[2] / "conf"), version_base=None):
        good, short = compose("train", overrides=layout + batch), compose("train", overrides=layout)
    run = run_config_from_dict(OmegaConf.to_container(good, resolve=True)).validate(8)
    assert run.model.parallel.virtual_pipeline_model_parallel_size == 7
    with pytest.raises(ConfigError, match=r"train.global_batch_size=8 / \(train.micro_batch_size=4 x data-parallel "
                                          r"size 1\) = 2, to be a multiple of pipeline_model_parallel_size=4"):
        run_config_from_dict(OmegaConf.to_container(short, resolve=True)).validate(8)


def test_valid_features_map_onto_megatron():
    from ualm_nemo.model.builder import transformer_config

    def mapped(**section):
        tc = transformer_config(_model(**section).validate())
        return tc.recompute_granularity, tc.recompute_method, tc.recompute_num_layers

    assert mapped() == (None, None, None)
    assert mapped(recompute={"granularity": "full"}) == ("full", "uniform", 1)
    assert mapped(recompute={"granularity": "full", "method": "block"}) == ("full", "block", 4)
    assert mapped(recompute={"granularity": "full", "method": "uniform", "num_layers": 2}) == ("full", "uniform", 2)
    tc = transformer_config(_model(recompute={"granularity": "selective", "modules": ["core_attn", "mlp"]}))
    assert tc.recompute_granularity == "selective" and tc.recompute_modules == ["core_attn", "mlp"]
    # FP8: megatron's own fields (its TransformerConfig checks them too); no TE needed to build the config
    tc = transformer_config(_model(**TE, fp8={"enabled": True, "recipe": "tensorwise", "margin": 1,
                                              "amax_history_len": 16, "amax_compute_algo": "most_recent",
                                              "bf16_layers_at_ends": 1}).validate())
    assert (tc.fp8, tc.fp8_recipe, tc.fp8_margin, tc.fp8_amax_history_len, tc.fp8_amax_compute_algo) == (
        "hybrid", "tensorwise", 1, 16, "most_recent")
    assert tc.first_last_layers_bf16 and tc.num_layers_at_start_in_bf16 == tc.num_layers_at_end_in_bf16 == 1
    off = transformer_config(_model(**TE))
    assert off.fp8 is None and not off.first_last_layers_bf16
    cp = transformer_config(_model(parallel={"context_parallel_size": 2, "transformer_impl": "transformer_engine"}))
    assert cp.context_parallel_size == 2


def test_build_refuses_what_is_not_wired_and_fp8_without_transformer_engine(monkeypatch):
    from ualm_nemo.model.builder import check_buildable

    with pytest.raises(ConfigError, match="context_parallel_size=2 is not supported yet"):
        check_buildable(_model(parallel={"context_parallel_size": 2, "transformer_impl": "transformer_engine"}))
    check_buildable(_model(parallel={"virtual_pipeline_model_parallel_size": 2, "pipeline_model_parallel_size": 2}))
    fp8 = _model(**TE, fp8={"enabled": True}).validate()
    monkeypatch.setitem(sys.modules, "transformer_engine", None)  # not importable, whatever this host has
    with pytest.raises(ConfigError, match=r"model.fp8.enabled=true needs Transformer Engine.*pip install"):
        check_buildable(fp8)
    with pytest.raises(ConfigError, match=r"model.parallel.transformer_impl=transformer_engine needs Transformer"):
        check_buildable(_model(**TE))
    check_buildable(fp8, check_imports=False)  # the launcher with a container image
    monkeypatch.setitem(sys.modules, "transformer_engine", types.ModuleType("transformer_engine"))
    check_buildable(fp8)
    check_buildable(_model().validate())  # plain local runs need nothing


def test_inference_and_conversion_drop_the_training_features():
    """A model trained with every feature on rebuilds on the local spec at TP1/PP1 (inference/load.py, convert)."""
    trained = _model(params_dtype="bf16", fp8={"enabled": True}, recompute={"granularity": "full"},
                     parallel={"transformer_impl": "transformer_engine", "context_parallel_size": 2,
                               "pipeline_model_parallel_size": 2, "virtual_pipeline_model_parallel_size": 2,
                               "overlap_grad_reduce": True, "overlap_param_gather": True,
                               "grad_reduce_in_bf16": True}).validate(8)
    plain = trained.without_training_features().with_parallel(pipeline_model_parallel_size=1,
                                                               transformer_impl="local")
    assert plain.validate(1).fp8.enabled is False and plain.recompute.granularity is None
    assert plain.parallel.context_parallel_size == 1 and plain.parallel.virtual_pipeline_model_parallel_size is None
    assert plain.backbone == trained.backbone and plain.params_dtype == "bf16"
