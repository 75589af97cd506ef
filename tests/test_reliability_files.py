"""Corrupt, hostile and shared files (issue 9): weights-only checkpoints, two checkpoints kept with
fallback, a checked and locked teacher-output cache, clear errors for truncated JSON files."""

import json
import logging
import multiprocessing
import os
from pathlib import Path

import pytest
import torch

from kdforge.engine import checkpoint as ckpt
from kdforge.errors import KDForgeError
from kdforge.io import file_record, read_json
from kdforge.recipes.teacher_cache import CacheSpec, TeacherCache, compute_outputs, read_entry
from tests.helpers import tiny_bert, tiny_llama
from tests.reliability_worker import bag_teacher, rows, share_one_cache
from tests.reliability_worker import collate as bag_collate
from tests.test_cache import Rows, collate
from tests.test_engine import Interrupt, train_tiny


class Payload:
    """Unpickling this object calls os.mkdir(marker): what a crafted checkpoint could do with a shell."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def interrupted_run(folder: Path, at_step: int = 5) -> Path:
    """A tiny run (8 steps per epoch, a checkpoint every 2 steps) killed at ``at_step``; its checkpoints' root."""

    def stop(trainer):
        if trainer.state.step == at_step:
            raise Interrupt

    with pytest.raises(Interrupt):
        train_tiny(folder, callbacks=[stop])
    return folder / "checkpoints" / "train"


def meta(folder: Path) -> dict:
    return json.loads((folder / "meta.json").read_text())


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def assert_same_run(a, b):
    (model_a, state_a), (model_b, state_b) = a, b
    assert state_a.step == state_b.step
    assert [h["loss"] for h in state_a.history] == pytest.approx([h["loss"] for h in state_b.history], abs=1e-6)
    for (name, x), (_, y) in zip(model_a.state_dict().items(), model_b.state_dict().items(), strict=True):
        assert torch.allclose(x, y, atol=1e-6), name


def warnings_in(records) -> list[str]:
    return [r.getMessage() for r in records if r.levelno == logging.WARNING]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp("reference"))


# -- checkpoints: weights only -------------------------------------------------------------------------------------


def test_checkpoints_hold_tensors_and_json_only_and_keep_the_previous_one(tmp_path):
    root = interrupted_run(tmp_path / "run")
    last, previous = root / "last", root / "previous"
    assert meta(last)["trainer"]["step"] == 4 and meta(previous)["trainer"]["step"] == 2  # two checkpoints kept
    for folder in (last, previous):
        assert sorted(p.name for p in folder.iterdir()) == ["meta.json", "rng-0.pt", "state.pt"]
        for name, record in meta(folder)["files"].items():
            assert file_record(folder / name) == record
            torch.load(folder / name, weights_only=True)  # would raise on any pickled Python object
    rng = torch.load(last / "rng-0.pt", weights_only=True)
    assert len(rng["python"][1]) == 625 and len(rng["numpy"][1]) == 624  # Mersenne Twister states as lists


def test_a_pickle_payload_in_state_pt_is_refused_and_never_runs(tmp_path):
    root = interrupted_run(tmp_path / "run")
    marker = tmp_path / "payload-ran"
    last = root / "last"
    torch.save({"module": Payload(marker), "optimizer": {}, "scheduler": {}}, last / "state.pt")
    description = meta(last)  # the attacker also rewrites meta.json so that the file checks out
    description["files"]["state.pt"] = file_record(last / "state.pt")
    (last / "meta.json").write_text(json.dumps(description))
    with pytest.raises(KDForgeError) as err:
        train_tiny(tmp_path / "run", resume=True)
    message = str(err.value)
    assert "state.pt" in message and "refuses" in message and "\n" not in message
    assert not marker.exists()
    with pytest.raises(KDForgeError, match="refuses"):
        ckpt.load(last / "state.pt")
    assert not marker.exists()


# -- checkpoints: corrupt files ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["state.pt", "rng-0.pt", "meta.json"])
def test_a_truncated_checkpoint_file_falls_back_to_the_previous_checkpoint(tmp_path, reference, name, kdlog):
    root = interrupted_run(tmp_path / "run")
    truncate(root / "last" / name)
    kdlog.clear()
    resumed = train_tiny(tmp_path / "run", resume=True)
    warnings = warnings_in(kdlog)
    assert len(warnings) == 1 and name in warnings[0] and "previous" in warnings[0]
    assert any("resumed from" in r.getMessage() and "previous" in r.getMessage() and "step 2" in r.getMessage()
               for r in kdlog)
    assert_same_run(resumed, reference)  # resuming from the older checkpoint is exact too


def test_a_corrupt_checkpoint_without_a_previous_one_is_one_clear_error(tmp_path):
    root = interrupted_run(tmp_path / "run", at_step=3)  # one checkpoint (step 2)
    assert not (root / "previous").exists()
    truncate(root / "last" / "rng-0.pt")
    with pytest.raises(KDForgeError) as err:
        train_tiny(tmp_path / "run", resume=True)
    message = str(err.value)
    assert "rng-0.pt" in message and "truncated" in message and "without --resume" in message
    assert "\n" not in message


def test_a_byte_flipped_state_pt_of_the_same_size_is_caught_by_its_checksum(tmp_path, kdlog):
    root = interrupted_run(tmp_path / "run")
    path = root / "last" / "state.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a flipped bit inside the weights, not a truncation
    path.write_bytes(bytes(data))
    kdlog.clear()
    _, state = train_tiny(tmp_path / "run", resume=True)
    warnings = warnings_in(kdlog)
    assert len(warnings) == 1 and "state.pt" in warnings[0] and "SHA-256" in warnings[0]
    assert state.step == 24


# -- teacher-output cache ------------------------------------------------------------------------------------------


def test_a_truncated_or_corrupt_cache_file_is_reported_and_rebuilt(tmp_path, kdlog):
    teacher, data = tiny_bert(100, layers=1, seed=0), Rows(12)
    built = TeacherCache.load_or_build(teacher, data, collate, "rows", batch_size=5, folder=tmp_path)
    path = next(tmp_path.glob("*.pt"))
    truncate(path)
    kdlog.clear()
    again = TeacherCache.load_or_build(teacher, data, collate, "rows", batch_size=5, folder=tmp_path)
    warnings = warnings_in(kdlog)
    assert len(warnings) == 1 and str(path) in warnings[0] and "truncated" in warnings[0] and "rebuild" in warnings[0]
    assert torch.equal(again.store["logits"], built.store["logits"])
    assert read_entry(path)[1] is None  # valid again
    # a cache file without its record (older kdforge) that does not load is rebuilt as well
    path.with_name(path.name + ".json").unlink()
    truncate(path)
    assert read_entry(path)[0] is None and "unreadable" in read_entry(path)[1]
    assert torch.equal(TeacherCache.load_or_build(teacher, data, collate, "rows", batch_size=5,
                                                  folder=tmp_path).store["logits"],
                       built.store["logits"])


def test_a_pickle_payload_in_a_cache_file_is_not_run(tmp_path):
    teacher, data = tiny_bert(100, layers=1, seed=0), Rows(6)
    TeacherCache.load_or_build(teacher, data, collate, "rows", folder=tmp_path)
    path, marker = next(tmp_path.glob("*.pt")), tmp_path / "payload-ran"
    torch.save({"logits": Payload(marker)}, path)
    path.with_name(path.name + ".json").write_text(json.dumps(file_record(path)))
    rebuilt = TeacherCache.load_or_build(teacher, data, collate, "rows", folder=tmp_path)
    assert not marker.exists() and rebuilt.store["logits"].shape == (6, 2)


def test_two_processes_sharing_one_cache_both_succeed_and_build_an_entry_once(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    barrier, counter = ctx.Barrier(2), tmp_path / "builds.txt"
    workers = [ctx.Process(target=share_one_cache, args=(str(tmp_path), i, barrier, str(counter))) for i in (0, 1)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=300)
    assert [w.exitcode for w in workers] == [0, 0]
    saved = torch.load(tmp_path / "shared.pt", weights_only=True)
    assert saved["i"] == 29 and torch.equal(saved["x"], torch.full((50_000,), 29.0))
    assert not list(tmp_path.glob(".shared.pt.*"))  # no temporary file left behind
    assert counter.read_text().split() in (["0"], ["1"])  # built once; the other process waited and reused it
    reference = compute_outputs(bag_teacher(), rows(), bag_collate, 4, "cpu", CacheSpec())["logits"]
    for worker in (0, 1):
        assert torch.allclose(torch.load(tmp_path / f"logits-{worker}.pt", weights_only=True), reference, atol=1e-6)
    [entry] = (tmp_path / "cache").glob("*.pt")
    store, problem = read_entry(entry)
    assert problem is None and torch.allclose(store["logits"], reference, atol=1e-6)


def test_compute_outputs_restores_the_teacher_mode_when_the_size_guard_refuses(monkeypatch):
    from kdforge.recipes import teacher_cache as cache

    teacher = tiny_llama(50, 16).train()
    rows = [{"input_ids": torch.randint(3, 50, (6,))} for _ in range(4)]

    def lm_collate(examples):
        ids = torch.stack([e["input_ids"] for e in examples])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    monkeypatch.setattr(cache, "DENSE_TOKEN_CACHE_MAX_BYTES", 10)
    with pytest.raises(KDForgeError, match="top_k"):
        compute_outputs(teacher, rows, lm_collate, 2, "cpu", CacheSpec())
    assert teacher.training


# -- JSON files ----------------------------------------------------------------------------------------------------


def test_read_json_names_a_truncated_missing_or_odd_file_and_the_fix(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({"history": [{"loss": 0.5}]}))
    assert read_json(path, "x") == {"history": [{"loss": 0.5}]}
    truncate(path)
    fix = "delete it and run `kdforge eval` again"
    for content in (None, path.read_text(), "[1, 2]", b"\xff\xfe"):
        if content is None:
            path.unlink()
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        with pytest.raises(KDForgeError) as err:
            read_json(path, fix)
        assert str(path) in str(err.value) and str(err.value).endswith(fix) and "\n" not in str(err.value)
