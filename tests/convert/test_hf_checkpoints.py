"""HF folders <-> UALM dist checkpoints through the CLIs: import, reshard, train, export, load with transformers.

One 2-process launch (process start-up dominates) runs every Megatron phase, each guarded so one failure
does not hide the others' results:

1. ``examples/convert_hf_to_ualm.py`` imports a random tiny HF Qwen2 folder (sharded safetensors) with the
   audio input on (tiny random encoder), then ``examples/convert_ualm_to_hf.py`` exports it again;
2. ``MegatronEngine.load_initial_weights`` puts the import into engines at (TP2, PP1) and (TP1, PP2): text logits vs HF;
3. the TP2 engine trains 2 steps and saves (optimizer included, no config recorded); its logits on a text
   batch and on an audio batch (audio input + audio tokens) are kept;
4. that TP2 checkpoint is exported (resharding load to TP1) -- and once more with a wrong config, and once
   with a writer that fails mid-way.

The parent process then checks everything with transformers alone.
"""

from __future__ import annotations

import json
import traceback
from pathlib import Path

import pytest
import torch

from ualm_nemo.testing.dist import run_distributed
from ualm_nemo.testing.examples import load_example
from ualm_nemo.testing.hf_folders import make_hf_folder, tiny_cfg as _cfg

pytestmark = pytest.mark.timeout(450)

V = 384  # tiny text vocab
SEQ = 16



def _stream_tokens(vocab, ids: torch.Tensor) -> torch.Tensor:
    return torch.tensor([[vocab.text_position_streams(int(t)) for t in row] for row in ids])


def _logits(chunk, batch: dict):
    """(stream0 [b, s, vocab], codebooks [b, s, 7, 1025]) on the last pipeline stage, None elsewhere."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def step(data_iterator, model):
        return model(**next(data_iterator)), None

    chunk.eval()
    with torch.no_grad():
        store = get_forward_backward_func()(forward_step_func=step, data_iterator=iter([batch]), model=[chunk],
                                            num_microbatches=1, seq_length=batch["tokens"].shape[1],
                                            micro_batch_size=batch["tokens"].shape[0], forward_only=True)
    if not parallel_state.is_pipeline_last_stage():
        return None
    return tuple(t.detach().clone() for t in store[0])


def _engine(tp: int, pp: int):
    from ualm_nemo.distributed.optim import OptimConfig
    from ualm_nemo.distributed.parallel import init_model_parallel
    from ualm_nemo.training.engine import MegatronEngine

    cfg = _cfg(tp, pp)
    init_model_parallel(cfg.parallel, seed=99)  # not the import's seed: weights must come from the checkpoint
    return MegatronEngine(cfg, OptimConfig(lr=1e-2, warmup_steps=1, weight_decay=0.0), max_steps=4)


def _phase(out: dict, name: str, fn) -> None:
    try:
        out[name] = fn()
    except Exception:
        out[name] = "FAILED\n" + traceback.format_exc()


def _worker(root: str) -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from ualm_nemo.testing.batches import random_batch

    r = Path(root)
    inputs = torch.load(r / "inputs.pt")
    out: dict = {}
    hf2u, u2hf = load_example("convert_hf_to_ualm"), load_example("convert_ualm_to_hf")
    _phase(out, "import", lambda: hf2u.main([str(r / "hf"), str(r / "imported"), "--model", "tiny",
                                              "--tensor-parallel", "2", "--new-rows-init", "normal", "--no-progress"]))
    _phase(out, "export_import", lambda: u2hf.main([str(r / "imported"), str(r / "hf_round_trip"), "--no-progress"]))

    def layout(tp, pp):
        engine = _engine(tp, pp)
        engine.load_initial_weights(r / "imported")
        return engine, _logits(engine.chunks[0], {"tokens": inputs["text_tokens"]})

    _phase(out, "pp2", lambda: layout(1, 2)[1])

    def train_tp2():
        engine, logits = layout(2, 1)
        vocab = engine.cfg.vocab
        batch = random_batch(vocab, 2, 5, with_audio_input=True)  # the same batch: the loss must drop
        losses = [engine.train_step([batch]).loss for _ in range(3)]  # (step 1 runs at warm-up lr 0)
        engine.save(str(r / "trained"))
        return {"imported_logits": logits, "losses": losses,
                "text": _logits(engine.chunks[0], {"tokens": inputs["text_tokens"]}),
                "audio": _logits(engine.chunks[0], inputs["audio_batch"])}

    _phase(out, "tp2", train_tp2)

    def from_checkpoint():
        """The HF-side class built straight from the TP2 training checkpoint (every rank joins the reads)."""
        from ualm_nemo.inference.hf_model import UALMForConditionalGeneration

        model = UALMForConditionalGeneration.from_checkpoint(r / "trained", attn_implementation="eager")
        with torch.no_grad():
            audio = model(**inputs["audio_batch"])
        return {"audio": audio, "dtype": str(model.lm.model.embed_tokens.weight.dtype)}

    _phase(out, "from_checkpoint", from_checkpoint)
    _phase(out, "export_trained", lambda: u2hf.main([str(r / "trained"), str(r / "hf_trained"), "--model", "tiny",
                                                     "--tokenizer", str(r / "hf"), "--max-shard-size", "300KB",
                                                     "--no-progress"]))

    def wrong_config():
        """One mismatch the recorded config catches up front, one only the checkpoint load can find."""
        from ualm_nemo.convert.configs import load_model_config
        from ualm_nemo.convert.exporter import export_hf_checkpoint

        errors = []
        for override in ("audio_out.head=per_codebook", "audio_in.encoder_dim=32"):
            try:
                export_hf_checkpoint(r / "trained", r / "hf_wrong", load_model_config("tiny", [override]),
                                     progress=False)
                errors.append("no error")
            except ValueError as err:
                errors.append(str(err))
        return errors

    _phase(out, "wrong_config", wrong_config)

    def interrupted():
        """Collective load at TP1 (both ranks), then rank 0 writes with a writer that fails at its 3rd shard."""
        from ualm_nemo.convert import hf_folder
        from ualm_nemo.convert.exporter import write_hf_folder
        from ualm_nemo.distributed import checkpoint
        from ualm_nemo.distributed.parallel import init_model_parallel
        from ualm_nemo.model.builder import build_model

        cfg = _cfg()
        init_model_parallel(cfg.parallel, seed=1)
        model = build_model(cfg)
        checkpoint.load_checkpoint(checkpoint.find_latest(r / "trained"), [model], restore_rng=False)
        if dist.get_rank() != 0:
            return None
        real_flush, calls = hf_folder.ShardedWriter.flush, []

        def failing_flush(self):
            calls.append(1)
            if len(calls) == 3:
                raise KeyboardInterrupt("simulated interrupt")
            real_flush(self)

        hf_folder.ShardedWriter.flush = failing_flush
        try:
            write_hf_folder(model.state_dict(), cfg, r / "hf_interrupted", progress=False, max_shard_bytes=100_000,
                            encoder_config=model.audio_input.encoder.tower.config)
        except KeyboardInterrupt:
            pass
        finally:
            hf_folder.ShardedWriter.flush = real_flush
        return {"calls": len(calls), "left": sorted(p.name for p in r.iterdir() if "interrupted" in p.name)}

    _phase(out, "interrupted", interrupted)

    def per_codebook():
        """A per-codebook-head model trained one step at TP2, exported: its logits, for the HF class to match."""
        from dataclasses import replace

        from ualm_nemo.distributed.optim import OptimConfig
        from ualm_nemo.distributed.parallel import init_model_parallel
        from ualm_nemo.training.engine import MegatronEngine

        cfg = _cfg(2, 1)
        cfg = replace(cfg, audio_out=replace(cfg.audio_out, head="per_codebook"))
        init_model_parallel(cfg.parallel, seed=5)
        engine = MegatronEngine(cfg, OptimConfig(lr=1e-2, warmup_steps=0, weight_decay=0.0), max_steps=2)
        engine.train_step([random_batch(cfg.vocab, 2, 5, with_audio_input=True)])
        engine.save(str(r / "per_codebook"))
        logits = _logits(engine.chunks[0], inputs["audio_batch"])  # before the export re-initialises at TP1
        rc = u2hf.main([str(r / "per_codebook"), str(r / "hf_per_codebook"), "--no-progress"])
        return {"rc": rc, "audio": logits}

    _phase(out, "per_codebook", per_codebook)
    _phase(out, "bf16_import", lambda: hf2u.main([str(r / "hf_bf16"), str(r / "imported_bf16"), "--model", "tiny",
                                                   "--params-dtype", "bf16", "--no-audio-input", "--no-progress"]))
    _phase(out, "bf16_export", lambda: u2hf.main([str(r / "imported_bf16"), str(r / "hf_bf16_back"),
                                                   "--no-progress"]))
    _phase(out, "streaming", lambda: _streaming_checks(r))
    _phase(out, "omni_import", lambda: hf2u.main([str(r / "hf"), str(r / "imported_omni"), "--model", "tiny",
                                                   "--audio-encoder", str(r / "omni"), "--no-progress"]))
    _phase(out, "omni_export", lambda: u2hf.main([str(r / "imported_omni"), str(r / "hf_omni"), "--no-progress"]))

    def af_whisper():
        """Import with an Audio Flamingo 3 folder's encoder (AF-Whisper), export; Megatron's audio logits."""
        from ualm_nemo.convert.importer import with_encoder
        from ualm_nemo.distributed.optim import OptimConfig
        from ualm_nemo.distributed.parallel import init_model_parallel
        from ualm_nemo.training.engine import MegatronEngine

        rcs = (hf2u.main([str(r / "hf"), str(r / "imported_af3"), "--model", "tiny", "--audio-encoder",
                          str(r / "af3"), "--no-progress"]),
               u2hf.main([str(r / "imported_af3"), str(r / "hf_af3"), "--no-progress"]))
        cfg = with_encoder(_cfg(), str(r / "af3"))
        init_model_parallel(cfg.parallel, seed=99)
        engine = MegatronEngine(cfg, OptimConfig(lr=1e-2, warmup_steps=1, weight_decay=0.0), max_steps=2)
        engine.load_initial_weights(r / "imported_af3")
        return {"rc": rcs, "audio": _logits(engine.chunks[0], inputs["audio_batch"]),
                "encoder": type(engine.chunks[0].audio_input.encoder.tower).__name__}

    _phase(out, "af_whisper", af_whisper)
    return out


def _streaming_checks(r: Path) -> dict:
    """The streamed reader and writer against megatron's own load/save, on the TP2 checkpoint trained above."""
    from torch.distributed.checkpoint.api import CheckpointException

    from ualm_nemo.distributed import checkpoint
    from ualm_nemo.distributed.parallel import init_model_parallel
    from ualm_nemo.distributed.streaming import StreamedCheckpointReader
    from ualm_nemo.model.builder import build_model

    trained = checkpoint.find_latest(r / "trained")
    init_model_parallel(_cfg().parallel, seed=1)
    reference = build_model(_cfg())  # megatron's reshard TP2 -> TP1, whole model in memory
    checkpoint.load_checkpoint(trained, [reference], restore_rng=False)
    state = {k: v for k, v in reference.state_dict().items() if isinstance(v, torch.Tensor)}
    skeleton = build_model(_cfg(), initialize=False, device="cpu")
    reader = StreamedCheckpointReader(skeleton, trained)
    out = {"keys": len(state), "reader_missing": sorted(set(state) - set(reader.keys())),
           "reader_mismatch": [k for k in reader.keys() if not torch.equal(reader.get(k), state[k])]}
    from ualm_nemo.convert.exporter import iter_export, num_export_tensors

    out["export_count"] = (num_export_tensors(reader, _cfg()), sum(1 for _ in iter_export(reader, _cfg())))
    calls = []

    def resolve(key):
        calls.append(key)
        return state[key].clone()

    checkpoint.save_checkpoint(r / "streamed", 0, [skeleton], None, common={"ualm_config": None}, resolve=resolve)
    out["calls"], out["distinct"] = len(calls), len(set(calls))
    try:
        checkpoint.save_checkpoint(r / "streamed", 1, [skeleton], None, common={}, resolve=lambda key: torch.zeros(3))
        out["bad_resolve"] = "no error"
    except (Exception, CheckpointException) as err:
        out["bad_resolve"] = str(err)
    out["after_bad"] = (sorted(p.name for p in (r / "streamed").iterdir()), (r / "streamed" / "latest").read_text())
    cfg2 = _cfg(2, 1)  # the streamed TP1 checkpoint loads at TP2 equal to the trained TP2 weights
    init_model_parallel(cfg2.parallel, seed=2)
    streamed, original = build_model(cfg2), build_model(cfg2)
    checkpoint.load_checkpoint(r / "streamed" / "iter_0000000", [streamed], restore_rng=False)
    checkpoint.load_checkpoint(trained, [original], restore_rng=False)
    want = original.state_dict()
    out["tp2_mismatch"] = [k for k, v in streamed.state_dict().items()
                           if isinstance(v, torch.Tensor) and not torch.equal(v, want[k])]
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from ualm_nemo.testing.batches import random_batch

    root = tmp_path_factory.mktemp("hf_ckpt")
    make_hf_folder(root / "hf")
    AutoModelForCausalLM.from_pretrained(root / "hf").to(torch.bfloat16).save_pretrained(root / "hf_bf16",
                                                                                         max_shard_size="200KB")
    from ualm_nemo.model.audio_input import build_audio_encoder
    from ualm_nemo.testing.encoder_folders import tiny_af_whisper, write_fake_af3_folder, write_fake_omni_folder

    torch.manual_seed(11)  # a Qwen2.5-Omni layout (thinker.audio_tower.*, LM shard unreadable), tiny random tower
    write_fake_omni_folder(root / "omni", build_audio_encoder(_cfg().audio_in).tower, nested=True, sharded=True)
    write_fake_af3_folder(root / "af3", tiny_af_whisper(window_seconds=1.0))  # AF-Whisper: 1 s windows
    vocab = _cfg().vocab
    ids = torch.randint(0, V, (2, SEQ), generator=torch.Generator().manual_seed(7))
    audio_batch = {k: v for k, v in random_batch(vocab, 2, 42, with_audio_input=True).model_inputs().items()
                   if k in ("tokens", "audio_features", "audio_feature_lens")}
    torch.save({"text_tokens": _stream_tokens(vocab, ids), "audio_batch": audio_batch}, root / "inputs.pt")
    results = run_distributed(2, _worker, str(root), timeout=400)
    torch.save(results, root / "results.pt")  # for debugging a failure
    hf = AutoModelForCausalLM.from_pretrained(root / "hf", attn_implementation="eager").eval()
    with torch.no_grad():
        hf_logits = hf(input_ids=ids).logits
    return {"root": root, "ranks": results, "ids": ids, "hf_logits": hf_logits, "audio_batch": audio_batch}


def _ok(world, phase: str, rank: int = 0):
    got = world["ranks"][rank][phase]
    assert not (isinstance(got, str) and got.startswith("FAILED")), f"{phase} rank {rank}:\n{got}"
    return got


def test_cli_import_loads_at_tp2_and_pp2_with_hf_logits(world):
    assert _ok(world, "import") == 0
    assert (world["root"] / "imported" / "latest").read_text() == "iter_0000000"
    assert world["hf_logits"].std() > 0.3
    for rank in range(2):
        tp2 = _ok(world, "tp2", rank)["imported_logits"][0][..., :V]
        torch.testing.assert_close(tp2, world["hf_logits"], atol=1e-5, rtol=1e-5, msg=f"TP2 rank {rank}")
    assert _ok(world, "pp2", 0) is None  # first stage
    torch.testing.assert_close(_ok(world, "pp2", 1)[0][..., :V], world["hf_logits"], atol=1e-5, rtol=1e-5)


def test_hf_ualm_hf_round_trip_is_bit_identical(world):
    from safetensors.torch import load_file

    from ualm_nemo.convert.hf_folder import HFFolder

    assert _ok(world, "export_import") == 0
    src, back = HFFolder(world["root"] / "hf"), HFFolder(world["root"] / "hf_round_trip")
    assert sorted(src.keys()) == sorted(back.keys())
    for key in src.keys():
        a, b = src.get(key), back.get(key)
        assert a.dtype == b.dtype and torch.equal(a, b), key
    for name in ("tokenizer.json", "tokenizer_config.json", "ualm_config.json", "audio.safetensors",
                 "audio_encoder/config.json", "audio_encoder/model.safetensors"):
        assert (world["root"] / "hf_round_trip" / name).is_file(), name
    config = json.loads((world["root"] / "hf_round_trip" / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["tie_word_embeddings"] is False


def test_trained_export_text_logits_match_megatron(world):
    from transformers import AutoModelForCausalLM

    tp2 = _ok(world, "tp2")
    assert _ok(world, "export_trained") == 0
    assert tp2["losses"][2] < tp2["losses"][0]
    folder = world["root"] / "hf_trained"
    assert len(list(folder.glob("model-*-of-*.safetensors"))) > 1 and (folder / "tokenizer.json").is_file()
    card = (folder / "README.md").read_text()  # the model card: the TP2 checkpoint's step, its shards listed
    assert f"- checkpoint: `{(world['root'] / 'trained' / 'iter_0000003').resolve()}`\n- step: 3\n" in card
    assert all(f"| `{p.name}` | a shard of the Qwen2 weights |" in card for p in folder.glob("model-*.safetensors"))
    hf = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        logits = hf(input_ids=world["ids"]).logits
    megatron = tp2["text"][0][..., :V]
    assert not torch.allclose(megatron, tp2["imported_logits"][0][..., :V], atol=1e-3)  # training changed it
    torch.testing.assert_close(logits, megatron, atol=1e-5, rtol=1e-5)
    generated = hf.generate(world["ids"][:1], max_new_tokens=6, do_sample=False)
    assert generated.shape == (1, SEQ + 6)


def test_exported_ualm_class_reproduces_audio_logits_and_generates(world):
    from ualm_nemo.inference.engine import GenerationConfig, Request
    from ualm_nemo.inference.generate import make_decoder
    from ualm_nemo.inference.hf_model import UALMForConditionalGeneration

    tp2 = _ok(world, "tp2")
    model = UALMForConditionalGeneration.from_pretrained(world["root"] / "hf_trained", attn_implementation="eager")
    batch = world["audio_batch"]
    with torch.no_grad():
        stream0, codebooks = model(**batch)
    torch.testing.assert_close(stream0, tp2["audio"][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(codebooks, tp2["audio"][1], atol=1e-5, rtol=1e-5)
    assert codebooks.shape[-2:] == (7, 1025)
    assert float(codebooks[..., :1024].std(-1).min()) > 0.05  # codes are told apart: a wrong row would show
    vocab = model.vocab
    decoder = make_decoder(model, vocab.text_vocab_size, [])
    requests = [Request(prompt=_stream_tokens(vocab, torch.tensor([[5, 9, 11]]))[0], mode="audio", seed=3),
                Request(prompt=_stream_tokens(vocab, world["ids"][:1])[0], mode="text")]
    audio, text = decoder.generate(requests, GenerationConfig(max_frames=6, max_text_tokens=6))
    codes = audio.audio[0]
    assert codes.shape[1] == 8 and 1 <= codes.shape[0] <= 6 and int(codes.max()) < vocab.codebook_size
    text = text.text_ids  # greedy text decoding == transformers' own greedy generate on the exported LM
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(world["root"] / "hf_trained", attn_implementation="eager")
    assert text == hf.generate(world["ids"][:1], max_new_tokens=6, do_sample=False)[0, SEQ:].tolist()


def test_failed_exports_leave_nothing(world):
    recorded, by_load = _ok(world, "wrong_config")
    assert "model.audio_out.head: checkpoint 'shared' != given 'per_codebook'" in recorded
    assert "does not match the model config: audio_input.adapter.fc1.weight: checkpoint (64, 64), config (64, 32)" \
        in by_load, by_load
    interrupted = _ok(world, "interrupted")
    assert interrupted == {"calls": 3, "left": []}
    assert not (world["root"] / "hf_wrong").exists()


def _tables(cfg, fill):
    from ualm_nemo.model.config import padded

    t, a = cfg.num_text_rows, cfg.num_audio_rows
    return {"embedding.text.weight": torch.full((padded(t), 64), fill), "heads.text_head.weight":
            torch.full((padded(t), 64), fill), "embedding.audio.weight": torch.full((padded(a), 64), fill),
            "heads.audio_head.weight": torch.full((padded(a), 64), fill)}


def test_new_rows_init():
    """mean: every new row is the given mean of the HF text rows; normal without a generator: kept; padding zero."""
    from ualm_nemo.convert.importer import VOCAB_TABLES, fill_new_rows
    from ualm_nemo.model.config import ConfigError

    cfg = _cfg()
    t, a = cfg.num_text_rows, cfg.num_audio_rows
    for how in ("mean", "normal"):
        state = {k: torch.randn_like(v) for k, v in _tables(cfg, 0.0).items()}
        before = {k: v.clone() for k, v in state.items()}
        means = {k: torch.randn(64) for k in ("model.embed_tokens.weight", "lm_head.weight")}
        for key, table in state.items():
            fill_new_rows(key, table, cfg, how, means[VOCAB_TABLES[key][0]])
        for text_key, audio_key, hf_key in (("embedding.text.weight", "embedding.audio.weight",
                                             "model.embed_tokens.weight"),
                                            ("heads.text_head.weight", "heads.audio_head.weight", "lm_head.weight")):
            assert torch.equal(state[text_key][:V], before[text_key][:V])  # HF rows untouched
            assert not state[text_key][t:].any() and not state[audio_key][a:].any()  # padding rows zero
            if how == "mean":
                for rows in (state[text_key][V:t], state[audio_key][:a]):
                    assert torch.equal(rows, means[hf_key].expand_as(rows))
            else:
                assert torch.equal(state[text_key][V:t], before[text_key][V:t])
                assert torch.equal(state[audio_key][:a], before[audio_key][:a])
    with pytest.raises(ConfigError, match="new_rows_init='zeros'"):
        fill_new_rows("embedding.text.weight", state["embedding.text.weight"], cfg, "zeros", None)
    with pytest.raises(ValueError, match="needs the mean"):
        fill_new_rows("embedding.text.weight", state["embedding.text.weight"], cfg, "mean", None)


def test_new_rows_drawn_from_seed():
    """An import builds the model without initialisation: 'normal' rows are drawn here from a generator fixed by
    (seed, table) -- the same rows whatever order the checkpoint writer asks for the tables in."""
    from ualm_nemo.convert.importer import fill_new_rows, table_generator

    cfg = _cfg()
    t, a = cfg.num_text_rows, cfg.num_audio_rows
    states = []
    for seed, order in ((5, 1), (5, -1), (6, 1)):
        state = {k: v.to(torch.bfloat16) for k, v in _tables(cfg, float("nan")).items()}
        for key in list(state)[::order]:
            fill_new_rows(key, state[key], cfg, "normal", None, table_generator(seed, key))
        states.append(state)
    for key in states[0]:
        rows = states[0][key][V:t] if "text" in key else states[0][key][:a]
        assert torch.isfinite(rows).all() and 0.5 * cfg.init_std < rows.float().std() < 2 * cfg.init_std, key
        assert torch.equal(states[0][key][V:], states[1][key][V:]), key  # same seed, any order: same rows
        assert not torch.equal(states[0][key][V:], states[2][key][V:]), key
    emb, head = states[0]["embedding.audio.weight"][:a], states[0]["heads.audio_head.weight"][:a]
    assert not torch.equal(emb, head)  # each table its own draw


def test_per_codebook_heads_export_reproduces_logits(world):
    from ualm_nemo.inference.hf_model import UALMForConditionalGeneration

    got = _ok(world, "per_codebook")
    assert got["rc"] == 0
    model = UALMForConditionalGeneration.from_pretrained(world["root"] / "hf_per_codebook",
                                                         attn_implementation="eager")
    assert model.codebook_heads is not None and model.stream_embedding is None
    with torch.no_grad():
        stream0, codebooks = model(**world["audio_batch"])
    torch.testing.assert_close(stream0, got["audio"][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(codebooks, got["audio"][1], atol=1e-5, rtol=1e-5)
    assert float(codebooks[..., :1024].std(-1).min()) > 0.05


def test_bf16_round_trip_is_bit_identical(world):
    """bf16 HF -> bf16 UALM checkpoint -> HF: every tensor bit-identical and still bf16 (no fp32 detour)."""
    from ualm_nemo.convert.hf_folder import HFFolder

    assert _ok(world, "bf16_import") == 0 and _ok(world, "bf16_export") == 0
    src, back = HFFolder(world["root"] / "hf_bf16"), HFFolder(world["root"] / "hf_bf16_back")
    assert sorted(src.keys()) == sorted(back.keys())
    for key in src.keys():
        a, b = src.get(key), back.get(key)
        assert a.dtype == b.dtype == torch.bfloat16 and torch.equal(a, b), key
    config = json.loads((world["root"] / "hf_bf16_back" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"


def test_streamed_reader_and_writer_match_megatron(world):
    got = _ok(world, "streaming")
    assert got["reader_missing"] == [] and got["reader_mismatch"] == []  # TP2 checkpoint read key by key
    assert got["export_count"][0] == got["export_count"][1] > 60  # the progress bar's total is exact
    assert got["calls"] == got["distinct"] == got["keys"]  # rank 0 makes every tensor once
    assert _ok(world, "streaming", 1)["calls"] == 0  # the other rank's copies are replicas: not written twice
    assert got["tp2_mismatch"] == []  # the streamed TP1 checkpoint reshards to TP2 exactly
    assert "made (3,) torch.float32, the checkpoint holds" in got["bad_resolve"], got["bad_resolve"]
    names, latest = got["after_bad"]
    assert latest == "iter_0000000" and "iter_0000001" not in names  # the failed save is never the latest


def test_import_reads_the_audio_tower_of_an_omni_folder(world):
    """--audio-encoder <Qwen2.5-Omni folder>: only thinker.audio_tower.* is read (the LM shard is not even a
    safetensors file), it lands in the checkpoint, and the export writes it back unchanged as audio_encoder/."""
    from safetensors.torch import load_file

    assert _ok(world, "omni_import") == 0 and _ok(world, "omni_export") == 0
    root = world["root"]
    source = {k.removeprefix("thinker.audio_tower."): v
              for k, v in load_file(root / "omni" / "model-00001-of-00002.safetensors").items()}
    exported = load_file(root / "hf_omni" / "audio_encoder" / "model.safetensors")
    assert sorted(exported) == sorted(source) and len(source) > 10
    for key, tensor in source.items():
        assert torch.equal(exported[key], tensor), key
    config = json.loads((root / "hf_omni" / "ualm_config.json").read_text())
    assert config["audio_in"]["encoder_path"] == "audio_encoder"


def test_af_whisper_encoder_through_import_and_export(world):
    """--audio-encoder <Audio Flamingo 3 folder>: the AF-Whisper tower is imported, trained-side logits come
    from it, and the exported HF folder (audio_encoder/ = AF-Whisper) reproduces them."""
    from ualm_nemo.inference.hf_model import UALMForConditionalGeneration

    got = _ok(world, "af_whisper")
    assert got["rc"] == (0, 0) and got["encoder"] == "AudioFlamingo3Encoder"
    config = json.loads((world["root"] / "hf_af3" / "audio_encoder" / "config.json").read_text())
    assert config["model_type"] == "audioflamingo3_encoder"
    model = UALMForConditionalGeneration.from_pretrained(world["root"] / "hf_af3", attn_implementation="eager")
    with torch.no_grad():
        stream0, codebooks = model(**world["audio_batch"])
    torch.testing.assert_close(stream0, got["audio"][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(codebooks, got["audio"][1], atol=1e-5, rtol=1e-5)


def test_kv_cached_generation_equals_full_recompute(world):
    """The exported, trained model: one cached step equals the full forward, and decoding (audio with CFG, text
    after an audio input) gives the same codes and text with the KV cache as recomputing every step."""
    from ualm_nemo.inference.engine import GenerationConfig, Request
    from ualm_nemo.inference.generate import make_decoder
    from ualm_nemo.inference.hf_model import UALMForConditionalGeneration

    model = UALMForConditionalGeneration.from_pretrained(world["root"] / "hf_trained", attn_implementation="eager")
    vocab = model.vocab
    tokens = world["audio_batch"]["tokens"]
    with torch.no_grad():  # one cached step against the full forward at the same position
        s0_full, cb_full = model(tokens[:, :9])
        _, _, cache = model.decode(tokens[:, :8])
        s0_step, cb_step, _ = model.decode(tokens[:, 8:9], cache)
    torch.testing.assert_close(s0_step, s0_full[:, -1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cb_step, cb_full[:, -1], rtol=1e-5, atol=1e-5)

    row = int((tokens[..., 0] == vocab.audio_in_id).sum(1).argmax())  # the row holding the audio placeholders
    length = int((tokens[row, :, 0] != vocab.pad_id).sum())
    clip = world["audio_batch"]["audio_features"][0, :, : int(world["audio_batch"]["audio_feature_lens"][0])]
    requests = [Request(prompt=_stream_tokens(vocab, torch.tensor([[5, 9, 11]]))[0], mode="audio", seed=3),
                Request(prompt=tokens[row, :length], audio_features=[clip], mode="text")]
    gen = GenerationConfig(max_frames=12, min_frames=6, max_text_tokens=6)
    cached, recomputed = (make_decoder(model, vocab.text_vocab_size, [], use_cache=c).generate(requests, gen)
                          for c in (True, False))
    assert cached[0].audio[0].shape[0] >= 6 and torch.equal(cached[0].audio[0], recomputed[0].audio[0])
    assert len(cached[1].text_ids) == 6 and cached[1].text_ids == recomputed[1].text_ids


def test_hf_class_from_training_checkpoint_matches_megatron(world):
    """UALMForConditionalGeneration.from_checkpoint: a TP2 training checkpoint, no HF folder in between."""
    got, tp2 = _ok(world, "from_checkpoint"), _ok(world, "tp2")
    torch.testing.assert_close(got["audio"][0], tp2["audio"][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["audio"][1], tp2["audio"][1], atol=1e-5, rtol=1e-5)
    assert got["dtype"] == "torch.float32"
