"""Shard index per Shar source: written by the tokenize stage, built when missing, rebuilt when stale or corrupt,
read by one rank and broadcast, with the counts of the per-shard meta path."""

from __future__ import annotations

import logging
import os
import shutil
import time

import pytest

from ualm_nemo.data.shar import meta_path, shard_counts, shards_dir, source_task
from ualm_nemo.data.shard_index import index_path, load_index, source_indexes
from ualm_nemo.testing.file_opens import FileOpens


def _copy(source: str, tmp_path, name: str = "src"):
    return shutil.copytree(source, tmp_path / name)


def test_tokenize_stage_writes_the_index_with_the_per_shard_counts(shar_sources):
    for source in shar_sources.values():
        assert index_path(source).is_file()
        with FileOpens(under=source) as opens:
            index = load_index(source)
        assert opens.paths == [str(index_path(source))]  # one file, no meta file
        assert index.counts == shard_counts(source) and index.task == source_task(source)


def test_split_tokenize_writes_the_index_once_every_shard_is_done(tmp_path):
    from ualm_nemo.data.cuts import prepare_source
    from ualm_nemo.data.synthetic import synthesize_demo_data
    from ualm_nemo.data.tokenize_stage import tokenize_source
    from ualm_nemo.testing.fake_codec import HashCodec

    manifests = synthesize_demo_data(tmp_path / "raw", num_tta=0, num_understanding=0, num_text=6, seed=1)
    prepare_source("text", manifests["text"], tmp_path / "prep")
    cuts, out = tmp_path / "prep" / "cuts.jsonl.gz", tmp_path / "shar"
    tokenize_source(cuts, out, HashCodec(), shard_size=2, shards=[0, 2], progress=False)
    assert not index_path(out).exists()  # shard 1 is another process's: not complete yet
    tokenize_source(cuts, out, HashCodec(), shard_size=2, shards=[1], progress=False)
    assert load_index(out).counts == shard_counts(out) == {0: 2, 1: 2, 2: 2}


def test_missing_index_is_built_once(shar_sources, tmp_path, caplog):
    source = _copy(shar_sources["tta"], tmp_path)
    index_path(source).unlink()
    with caplog.at_level(logging.INFO), FileOpens(under=source) as first:
        built = load_index(source)
    assert "is missing: building it" in caplog.text
    assert index_path(source).is_file() and built.counts == shard_counts(source)
    assert sum("/meta/" in p for p in first.paths) == len(built.counts)  # the per-shard read, this once
    with FileOpens(under=source) as second:
        assert load_index(source) == built
    assert second.count == 1


def test_stale_index_is_said_and_rebuilt(shar_sources, tmp_path, caplog):
    source = _copy(shar_sources["text"], tmp_path)
    before = load_index(source)
    last = max(before.counts)
    time.sleep(0.05)  # past the file system's timestamp granularity
    meta_path(source, last).unlink()  # shard unfinished again (as a rerun would leave it)
    with caplog.at_level(logging.WARNING):
        after = load_index(source)
    assert "is stale" in caplog.text and "meta_files" in caplog.text
    assert after.counts == shard_counts(source) and last not in after.counts and last in before.counts
    # a shard rewritten in place (same number of files): the folder's mtime says so
    caplog.clear()
    part = meta_path(source, 0).with_suffix(".json.tmp")
    part.write_text('{"num_cuts": 1, "num_rejects": 3, "fields": [], "audio_seconds": 0}\n')
    time.sleep(0.05)
    os.replace(part, meta_path(source, 0))
    with caplog.at_level(logging.WARNING):
        rewritten = load_index(source)
    assert "is stale" in caplog.text and rewritten.counts[0] == 1 == shard_counts(source)[0]


@pytest.mark.parametrize("text", ["{", '{"version": 1, "shards": [0, 1], "counts": [4]}', "[]",
                                  '{"version": 0, "shards": [], "counts": [], "task": null, "fingerprint": {}}'])
def test_corrupt_index_is_said_and_rebuilt(shar_sources, tmp_path, caplog, text):
    source = _copy(shar_sources["understanding"], tmp_path)
    index_path(source).write_text(text)
    with caplog.at_level(logging.WARNING):
        index = load_index(source)
    assert "is unreadable" in caplog.text
    assert index.counts == shard_counts(source) and load_index(source) == index


def test_read_only_source_still_gets_correct_counts(shar_sources, tmp_path, caplog):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    source = _copy(shar_sources["text"], tmp_path)
    index_path(source).unlink()
    source.chmod(0o555)
    try:
        with caplog.at_level(logging.WARNING):
            assert load_index(source).counts == shard_counts(source)
        assert "cannot write" in caplog.text
    finally:
        source.chmod(0o755)


def test_no_shards_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no shards/ folder"):
        load_index(tmp_path)


def _read_on_each_rank(sources: list[str]) -> dict:
    """source_indexes and a Shar loader on this rank, counting what it opens inside the sources."""
    import torch.distributed as dist

    from ualm_nemo.data.formatting import SampleFormatter
    from ualm_nemo.data.shar_dataset import SharBatchLoader, SharLoaderConfig
    from ualm_nemo.data.tokenizer import ByteChatTokenizer
    from ualm_nemo.model.vocab import UnifiedVocab

    with FileOpens(under=sources) as opens:
        indexes = source_indexes(sources)
        cfg = SharLoaderConfig(sources=[{"name": f"s{i}", "shar_dir": s, "weight": 1.0}
                                        for i, s in enumerate(sources)], window_size=8, max_tokens=2048, seq_len=1024)
        formatter = SampleFormatter(ByteChatTokenizer(), UnifiedVocab(text_vocab_size=384))
        loader = SharBatchLoader(cfg, formatter, dist.get_rank(), dist.get_world_size())
    return {"counts": [i.counts for i in indexes], "tasks": [i.task for i in indexes], "opened": opens.paths,
            "sizes": loader.source_sizes}


def test_rank0_reads_and_broadcasts(shar_sources, tmp_path):
    """2 gloo processes: rank 0 reads the indexes (one missing: built there), rank 1 opens no file of the sources;
    both get the counts of the per-shard path, and so does the loader built on each rank."""
    from ualm_nemo.testing.dist import run_distributed

    sources = [str(_copy(s, tmp_path, name)) for name, s in sorted(shar_sources.items())]
    index_path(sources[0]).unlink()
    out = run_distributed(2, _read_on_each_rank, sources)
    assert out[1]["opened"] == []
    per_shard = [p for p in out[0]["opened"] if "/meta/" in p or "/shards/" in p]
    assert per_shard and all(p.startswith(sources[0] + "/") for p in per_shard)  # the build of the missing one
    assert {p for p in out[0]["opened"] if not p.startswith(sources[0] + "/")} == {
        str(index_path(s)) for s in sources[1:]}  # the others: their index file, nothing else
    want = [shard_counts(s) for s in sources]
    for rank in (0, 1):
        assert out[rank]["counts"] == want and out[rank]["tasks"] == [source_task(s) for s in sources]
        assert list(out[rank]["sizes"].values()) == [sum(c.values()) for c in want]
    assert shards_dir(sources[0]).is_dir() and index_path(sources[0]).is_file()
