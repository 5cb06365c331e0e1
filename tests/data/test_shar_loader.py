"""The Shar training loader: exact resume, worker-count independence, DP epochs without repeats or misses, blending."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest

from ualm_nemo.data.formatting import SampleFormatter
from ualm_nemo.data.shar import shard_counts
from ualm_nemo.data.shar_dataset import SharBatchLoader, SharLoaderConfig, SourceView
from ualm_nemo.data.tokenizer import ByteChatTokenizer
from ualm_nemo.model.vocab import UnifiedVocab
from ualm_nemo.testing.batches import same_batch

V = UnifiedVocab(text_vocab_size=384)


def _formatter() -> SampleFormatter:
    return SampleFormatter(ByteChatTokenizer(), V, cfg_dropout=0.3)


def _cfg(shar_sources, **kw) -> SharLoaderConfig:
    base = dict(sources=[{"name": t, "shar_dir": d, "weight": w}
                         for (t, d), w in zip(shar_sources.items(), (2.0, 1.0, 1.0))],
                window_size=8, max_tokens=2048, seq_len=1024, seed=5)
    return SharLoaderConfig(**{**base, **kw})


def _take(loader, n):
    return list(itertools.islice(iter(loader), n))


@pytest.mark.parametrize("pack", [False, True])
def test_resume_equals_uninterrupted_run(shar_sources, pack):
    cfg = _cfg(shar_sources, pack=pack)
    full = _take(SharBatchLoader(cfg, _formatter()), 14)
    assert {t for b in full for t in b.tasks} == {"tta", "understanding", "text"}
    assert any(b.audio_features is not None for b in full)
    if pack:
        assert all(b.tokens.shape[1] == 1024 and b.segment_ids is not None for b in full)
        assert max(int(b.segment_ids.max()) for b in full) >= 2  # several samples per row

    for k in (1, 5, 9):  # mid-window and window boundaries alike
        first = SharBatchLoader(cfg, _formatter())
        head = _take(first, k)
        state = first.state_dict()
        assert state == {**head[-1].loader_state}  # what a prefetching trainer saves from the batch itself
        resumed = SharBatchLoader(cfg, _formatter())
        resumed.load_state_dict(state)
        tail = _take(resumed, 14 - k)
        assert all(same_batch(x, y) for x, y in zip(head + tail, full, strict=True)), k


def test_batches_do_not_depend_on_worker_count(shar_sources):
    cfg = _cfg(shar_sources, window_size=6)
    alone = _take(SharBatchLoader(cfg, _formatter()), 10)
    workers = SharBatchLoader(_cfg(shar_sources, window_size=6, num_workers=2), _formatter())
    pooled = _take(workers, 10)
    assert all(same_batch(x, y) for x, y in zip(alone, pooled, strict=True))
    resumed = SharBatchLoader(_cfg(shar_sources, window_size=6, num_workers=2), _formatter())
    resumed.load_state_dict(pooled[6].loader_state)
    assert all(same_batch(x, y) for x, y in zip(_take(resumed, 3), alone[7:10], strict=True))


@pytest.mark.parametrize("world,window", [(2, 4), (4, 3)])  # 3 text shards: split by shard (W=2), by item (W=4)
def test_dp_ranks_cover_each_epoch_once(shar_sources, world, window):
    spec = [{"name": "text", "shar_dir": shar_sources["text"], "weight": 1.0}]
    counts = shard_counts(shar_sources["text"])
    all_ids = [f"text/text-{k:08d}" for k in range(sum(counts.values()))]
    for epochs in (1, 2):
        seen: list[str] = []
        for rank in range(world):
            view = SourceView("text", counts, seed=5, rank=rank, world=world)
            n = sum(view.epoch_length(e) for e in range(epochs))
            assert n % window == 0  # epochs end on a window boundary here, so batches never straddle them
            loader = SharBatchLoader(SharLoaderConfig(sources=spec, window_size=window, seed=5), _formatter(),
                                     dp_rank=rank, dp_size=world)
            ids: list[str] = []
            for batch in loader:
                ids += batch.ids
                if len(ids) >= n:
                    break
            assert len(ids) == n
            seen += ids
        assert Counter(seen) == Counter(all_ids * epochs), (world, epochs)


def test_loader_blend_proportions(shar_sources):
    sources = [{"name": "a", "shar_dir": shar_sources["text"], "weight": 3.0},
               {"name": "b", "shar_dir": shar_sources["text"], "weight": 1.0}]
    loader = SharBatchLoader(SharLoaderConfig(sources=sources, weighting="fixed", window_size=64, seed=1,
                                              max_tokens=8192), _formatter())
    counts: Counter = Counter()
    for batch in loader:
        counts.update(i.split("/")[0] for i in batch.ids)
        if loader.state_dict()["window"] == 25 and loader.state_dict()["batch_in_window"] == 0:
            break
    n = sum(counts.values())
    assert n == 25 * 64
    sigma = np.sqrt(n * 0.75 * 0.25)
    assert abs(counts["a"] - 0.75 * n) < 3 * sigma, counts


def test_too_long_samples_are_skipped_and_counted(shar_sources, caplog):
    cfg = _cfg(shar_sources, seq_len=120, max_tokens=512)
    batches = _take(SharBatchLoader(cfg, _formatter()), 3)
    assert all(b.tokens.shape[1] <= 120 for b in batches)
    assert "longer than 120 positions" in caplog.text


def test_a_loader_where_no_sample_fits_stops_with_an_error(shar_sources):
    """Every sample skipped would otherwise draw windows forever: the loader stops once it has drawn more samples
    than all its sources hold without making a batch."""
    with pytest.raises(ValueError, match="every sample is longer than 4 positions"):
        _take(SharBatchLoader(_cfg(shar_sources, seq_len=4, max_tokens=512), _formatter()), 1)


def test_loader_state_refuses_other_settings(shar_sources):
    loader = SharBatchLoader(_cfg(shar_sources), _formatter())
    _take(loader, 2)
    state = loader.state_dict()
    for other in (_cfg(shar_sources, seed=6), _cfg(shar_sources, window_size=9)):
        with pytest.raises(ValueError, match="different data settings"):
            SharBatchLoader(other, _formatter()).load_state_dict(state)
    with pytest.raises(ValueError, match="dp_size"):
        SharBatchLoader(_cfg(shar_sources), _formatter(), dp_rank=0, dp_size=2).load_state_dict(state)


def test_loader_config_errors(shar_sources, tmp_path):
    with pytest.raises(ValueError, match="sources is empty"):
        SharLoaderConfig(sources=[])
    with pytest.raises(ValueError, match="unique"):
        SharLoaderConfig(sources=[{"name": "a", "shar_dir": "x"}, {"name": "a", "shar_dir": "y"}])
    with pytest.raises(ValueError, match="packed row"):
        SharLoaderConfig(sources=[{"name": "a", "shar_dir": "x"}], pack=True, seq_len=4096, max_tokens=1024)
    with pytest.raises(FileNotFoundError, match="shards/"):
        SharBatchLoader(SharLoaderConfig(sources=[{"name": "a", "shar_dir": str(tmp_path)}]), _formatter())
    counts = shard_counts(shar_sources["understanding"])
    with pytest.raises(ValueError, match="data-parallel ranks"):
        SourceView("u", counts, seed=0, rank=0, world=sum(counts.values()) + 1)


def test_conf_presets_build_a_loader(shar_sources):
    """conf/data/pretrain_blend.yaml (the paper's 2x generation up-weighting) -> SharLoaderConfig -> batches."""
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    conf = Path(__file__).resolve().parents[2] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base=None):
        cfg = compose("train", overrides=["data=pretrain_blend", "data.tokenizer=byte",
                                          "data.shar.num_workers=0", "data.shar.pack=false"])
    shar = OmegaConf.to_container(cfg.data.shar, resolve=True)
    dirs = {"understanding": shar_sources["understanding"], "generation": shar_sources["tta"],
            "text": shar_sources["text"]}
    for source in shar["sources"]:
        source["shar_dir"] = dirs[source["name"]]
    loader = SharBatchLoader(SharLoaderConfig(**shar), _formatter())
    sizes = {"understanding": 8, "generation": 14, "text": 12}
    expected = {n: w * sizes[n] for n, w in (("understanding", 1.0), ("generation", 2.0), ("text", 1.0))}
    total = sum(expected.values())
    assert loader.probabilities == pytest.approx({n: v / total for n, v in expected.items()})
    assert loader.cfg.seed == cfg.data.seed and loader.cfg.pack is False
    assert _take(loader, 1)[0].tokens.shape[-1] == 8


def test_prepare_and_tokenize_clis(tmp_path):
    import subprocess
    import sys

    from ualm_nemo.data.synthetic import synthesize_demo_data

    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    m = synthesize_demo_data(tmp_path / "raw", num_tta=2, num_understanding=1, num_text=2, seed=1)
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1"}
    run = lambda *a: subprocess.run([sys.executable, *a], cwd=root, env=env, capture_output=True, text=True,  # noqa
                                    check=True).stdout
    out = run("examples/prepare_data.py", "--out", str(tmp_path / "prep"), "--source", f"gen=tta:{m['tta']}",
              "--source", f"chat=text:{m['text']}")
    assert '"cuts": 4' in out and '"rejects": 0' in out
    out = run("examples/tokenize_audio.py", "--cuts", str(tmp_path / "prep/gen/cuts.jsonl.gz"), "--out",
              str(tmp_path / "shar/gen"), "--codec", "tiny", "--shard-size", "1", "--no-progress", "--rank", "0",
              "--world", "1")
    assert '"written": 2' in out and '"cuts": 2' in out
    out = run("examples/tokenize_audio.py", "--cuts", str(tmp_path / "prep/gen/cuts.jsonl.gz"), "--out",
              str(tmp_path / "shar/gen"), "--codec", "tiny", "--shard-size", "1", "--no-progress", "--shards", "0:2")
    assert '"written": 0' in out and '"skipped_finished": 2' in out
    with pytest.raises(subprocess.CalledProcessError):
        run("examples/prepare_data.py", "--out", str(tmp_path / "p2"), "--source", "bad-spec")
