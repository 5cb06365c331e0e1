"""The in-memory manifest path encodes every TTA clip once per run: rank 0 encodes and writes
``<output_dir>/codes_cache.pt``, the other ranks and every later job (a resume, a requeue) read it; a cache
written with another codec is recognised and rebuilt."""

from __future__ import annotations

from ualm_nemo.testing.dist import run_distributed


def _build_twice(output_dir: str) -> dict:
    import torch.distributed
    from ualm_nemo.codec.xcodec import CodecTokenizer
    from ualm_nemo.model.config import BACKBONES, AudioInputConfig, UALMConfig
    from ualm_nemo.training.data_setup import build_train_dataset
    from ualm_nemo.training.run_config import DataConfig

    calls = []
    encode = CodecTokenizer.encode
    CodecTokenizer.encode = lambda self, wavs: calls.append(len(wavs)) or encode(self, wavs)
    model = UALMConfig(backbone=BACKBONES["tiny"], audio_in=AudioInputConfig(random_encoder=True))
    data = DataConfig(synthesize=True, synthetic_samples_per_task=6)
    first, _ = build_train_dataset(data, model, output_dir)  # the first job
    encoded_first = sum(calls)
    torch.distributed.barrier()  # the next job starts after this one ended on every rank (it re-synthesises)
    second, _ = build_train_dataset(data, model, output_dir)  # the next job of the run
    return {"first_job": encoded_first, "second_job": sum(calls) - encoded_first,
            "codes": [c for c in first.codes if c is not None], "again": [c for c in second.codes if c is not None]}


def test_clips_are_encoded_once_per_run_not_per_rank_and_job(tmp_path):
    import torch

    got = run_distributed(2, _build_twice, str(tmp_path))
    assert got[0]["first_job"] == 6 and got[1]["first_job"] == 0  # rank 0 encoded the 6 clips, rank 1 read them
    assert got[0]["second_job"] == got[1]["second_job"] == 0
    for rank in (0, 1):
        assert len(got[rank]["codes"]) == 6
        assert all(torch.equal(a, b) for a, b in zip(got[0]["codes"], got[rank]["again"]))
    assert (tmp_path / "codes_cache.pt").is_file() and not list(tmp_path.glob("codes_cache.pt.tmp-*"))
