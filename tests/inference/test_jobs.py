"""inference/jobs.py directly (no model): item fields the CLI does not show, and the manifest cases cheaper to
build by hand than through a killed run. tests/inference/test_generate_cli.py covers the command on top."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ualm_nemo.inference.jobs import MANIFEST, MAX_REPORTED, Item, JobError, ManifestConflict, OutputFolder, \
    read_items

SETTINGS = {"cfg_scale": 3.0, "top_k": 20}


def _finished(path: Path, items: list[Item], settings: dict = SETTINGS) -> None:
    """A folder where ``items`` are done."""
    with OutputFolder(path, settings) as folder:
        folder.prepare(folder.plan(items))
        for item in items:
            folder.add(item, torch.full((1, 320), 0.1), 16000, frames=1)


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / MANIFEST).read_text().splitlines()]


def test_items_keep_other_fields_and_number_every_source(tmp_path):
    path = tmp_path / "items.jsonl"
    path.write_text(json.dumps({"caption": "dog", "id": 7, "ref": "dog.wav", "group": 2}) + "\n\n"
                    + json.dumps({"caption": "rain", "seed": 99}) + "\n")
    items = read_items(path, [("--caption #1", {"caption": "wind"})], first_seed=10)
    assert items == [Item("7", "dog", 10), Item("00001", "rain", 99), Item("00002", "wind", 12)]
    assert items[0].extra == {"ref": "dog.wav", "group": 2} and items[1].extra == items[2].extra == {}


def test_bad_items_are_counted_but_listed_up_to_a_limit(tmp_path):
    path = tmp_path / "items.jsonl"
    path.write_bytes(b"\xff\xfe\n" + b"{}\n" * (MAX_REPORTED + 4))
    with pytest.raises(JobError) as err:
        read_items(path)
    message = str(err.value)
    assert message.startswith(f"{MAX_REPORTED + 5} bad caption item(s):") and f"{path}:1: not UTF-8" in message
    assert message.count('no "caption"') == MAX_REPORTED - 1 and message.endswith("... and 5 more")


def test_torn_last_line_is_redone_but_a_bad_middle_line_is_refused(tmp_path):
    items = [Item("a", "dog", 0), Item("b", "rain", 1), Item("c", "wind", 2)]
    _finished(tmp_path, items)
    whole = (tmp_path / MANIFEST).read_text()
    (tmp_path / MANIFEST).write_text(whole[:-20])  # c's line torn mid-append (its wav already in place)
    with OutputFolder(tmp_path, SETTINGS) as folder:
        plan = folder.plan(items)
        assert [i.id for i in plan.todo] == ["c"] and plan.done == 2 and plan.rewrite
        assert plan.notes == [f"{tmp_path / MANIFEST}:3: incomplete last line (interrupted run), ignored"]
        folder.prepare(plan)
        folder.add(items[2], torch.full((1, 320), 0.1), 16000, frames=1)
    assert (tmp_path / MANIFEST).read_text() == whole  # rewritten without the torn line, then c appended

    lines = whole.splitlines(keepends=True)
    (tmp_path / MANIFEST).write_text(lines[0] + "{oops\n" + lines[2])
    with OutputFolder(tmp_path, SETTINGS) as folder, pytest.raises(ManifestConflict, match=f"{MANIFEST}:2 is not"):
        folder.plan(items)


def test_unterminated_repeated_and_orphaned_lines_make_a_clean_manifest(tmp_path):
    items = [Item("a", "dog", 0), Item("b", "rain", 1)]
    _finished(tmp_path, items)
    a, b = (tmp_path / MANIFEST).read_text().splitlines()
    (tmp_path / MANIFEST).write_text(f"{b}\n{a}\n{b}")  # b twice, and no newline after the last (whole) line
    with OutputFolder(tmp_path, SETTINGS) as folder:
        plan = folder.plan(items)
        assert plan.todo == [] and plan.rewrite and list(plan.kept) == ["b", "a"]
    (tmp_path / "a.wav").unlink()  # listed, but its wav is gone: redone
    with OutputFolder(tmp_path, SETTINGS) as folder:
        plan = folder.plan(items)
        assert [i.id for i in plan.todo] == ["a"] and list(plan.kept) == ["b"]
        folder.prepare(plan)
        folder.add(items[0], torch.full((1, 320), 0.1), 16000, frames=1)
    assert [e["id"] for e in _lines(tmp_path)] == ["b", "a"]


def test_run_settings_and_seeds_must_match(tmp_path):
    items = [Item(f"i{k}", "dog", k) for k in range(7)]
    _finished(tmp_path, items)
    with OutputFolder(tmp_path, {**SETTINGS, "top_k": 5}) as folder, pytest.raises(ManifestConflict) as err:
        folder.plan(items)
    assert "holds 7 of these items with other settings (i0: top_k 20 -> 5; i1:" in str(err.value)
    assert str(err.value).endswith("; ...)")  # five listed
    with OutputFolder(tmp_path, SETTINGS) as folder, pytest.raises(ManifestConflict, match="i3: seed 3 -> 4"):
        folder.plan([Item("i3", "dog", 4)])
    with OutputFolder(tmp_path, {**SETTINGS, "new_key": 1}) as folder, pytest.raises(ManifestConflict):
        folder.plan(items)  # lines without a setting this run records are not this run's


def test_overwrite_removes_the_listed_wavs_only(tmp_path):
    _finished(tmp_path, [Item("a", "dog", 0)])
    (tmp_path / "notes.wav").write_bytes(b"mine")
    (tmp_path / "outside.wav").write_bytes(b"mine")
    with open(tmp_path / MANIFEST, "a") as f:
        f.write(json.dumps({"audio": "../outside.wav"}) + "\nnot json\n")  # overwrite does not even parse it
    with OutputFolder(tmp_path, SETTINGS) as folder:
        plan = folder.plan([Item("b", "rain", 1)], overwrite=True)
        folder.prepare(plan)
        assert plan.todo == [Item("b", "rain", 1)]
        with pytest.raises(ValueError, match="manifest's own"):
            folder.add(plan.todo[0], torch.zeros(1, 320), 16000, seed=5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.jsonl", "notes.wav", "outside.wav"]
    assert (tmp_path / MANIFEST).read_text() == ""


def test_a_file_is_no_output_folder(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(JobError, match="exists and is not a folder"), OutputFolder(tmp_path / "f", SETTINGS):
        pass
