"""kdforge.provenance: the config as a difference from defaults, the provenance record, PhaseTimer."""

from __future__ import annotations

import copy
import json
import sys
import time
from datetime import datetime, timedelta
from importlib import metadata

import pytest
import torch

import kdforge
from kdforge import provenance
from kdforge.config import apply_overrides, validate_config
from kdforge.provenance import PhaseTimer, collect_provenance, config_diff, cpu_model, required_tree

BASE = {"task": {"name": "csv"}, "teacher": {"model": "some/teacher"}}


def config(**sections):
    return validate_config({**copy.deepcopy(BASE), **sections})


def test_config_diff_is_exactly_the_changed_keys():
    # train.epochs is set to its default value (3): not a difference
    job = config(train={"lr": 3e-5, "epochs": 3}, eval={"batch_size": 8})
    assert config_diff(job) == {"train.lr": 3e-5, "eval.batch_size": 8}
    assert config_diff(config()) == {}


def test_config_diff_lists_whole_new_sections_and_round_trips():
    tree = {
        "task": {"name": "csv", "train_file": "t.csv", "text_columns": ["a", "b"]},
        "teacher": {"model": "some/teacher", "finetune": {"epochs": 1}},
        "teachers": {"second": {"model": "other/teacher"}},  # required (its model), like `teacher`
        "student": {"layers": [0, 2]},
        "assistants": {"ta": {"layers": [0, 1, 2]}},
        "objectives": [{"name": "ce", "weight": 0.5}, {"name": "hinton_kd", "weight": 0.5, "temperature": 4.0}],
        "train": {"seed": 7, "max_grad_norm": None},
    }
    job = validate_config(copy.deepcopy(tree))
    diff = config_diff(job)
    assert diff["task.text_columns"] == ["a", "b"]  # a list, compared and reported whole
    assert diff["teacher.finetune"] == {"epochs": 1, "lr": 5e-5, "batch_size": 32, "seed": None,  # default None
                                        "store": True}
    assert diff["assistants.ta"]["layers"] == [0, 1, 2]  # a role not in the default: whole
    assert diff["student"]["layers"] == [0, 2] and diff["train.max_grad_norm"] is None
    assert "objectives" not in diff  # the default objectives, unchanged
    assert set(diff) == {"task.train_file", "task.text_columns", "teacher.finetune", "assistants.ta", "student",
                         "train.seed", "train.max_grad_norm"}
    assert required_tree(job)["teachers"] == {"second": {"model": "other/teacher"}}
    rebuilt = validate_config(apply_overrides(required_tree(job), copy.deepcopy(diff)))
    assert rebuilt == job


def test_provenance_is_json_and_holds_the_versions():
    argv = ["distill", "my config.yaml", "--set", "train.lr=1e-4"]
    record = collect_provenance(config(train={"lr": 1e-4}), argv=argv)
    assert json.loads(json.dumps(record, allow_nan=False)) == record
    versions = record["versions"]
    assert versions["torch"] == metadata.version("torch") and versions["torch"].startswith(torch.__version__[:4])
    assert versions["transformers"] == metadata.version("transformers")
    assert versions["kdforge"] == metadata.version("kdforge")
    assert versions["python"] == "{}.{}.{}".format(*sys.version_info[:3])
    assert record["torch_threads"] == torch.get_num_threads() and record["logical_cpus"] >= 1
    assert datetime.fromisoformat(record["date"]).utcoffset() == timedelta(0)
    assert record["command"] == "kdforge distill 'my config.yaml' --set train.lr=1e-4"
    assert record["config_diff"] == {"train.lr": 1e-4}


def test_command_from_the_console_script_and_from_the_api(monkeypatch):
    job = config(student={"layers": [1]}, train={"epochs": 1})
    monkeypatch.setattr(sys, "argv", ["/usr/local/bin/kdforge", "finetune", "c.yaml"])
    assert collect_provenance(job)["command"] == "kdforge finetune c.yaml"

    monkeypatch.setattr(sys, "argv", ["my_script.py", "--flag"])
    snippet = collect_provenance(job)["command"]
    assert snippet.startswith("import kdforge; kdforge.distill(")
    calls = []
    monkeypatch.setattr(kdforge, "distill", lambda tree, overrides: calls.append((tree, overrides)))
    exec(snippet, {})
    (tree, overrides), = calls
    assert validate_config(apply_overrides(tree, overrides)) == job


def test_cpu_model_reads_cpuinfo_with_fallback(tmp_path, monkeypatch):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: X\nmodel name\t: Test CPU @ 2.0GHz\n\nprocessor\t: 1\n")
    assert cpu_model(info) == "Test CPU @ 2.0GHz"
    monkeypatch.setattr(provenance.platform, "processor", lambda: "x86_64")
    assert cpu_model(tmp_path / "missing") == "x86_64"
    monkeypatch.setattr(provenance.platform, "processor", lambda: "")
    assert cpu_model(tmp_path / "missing") is None


def test_phase_timer_with_a_fake_clock(monkeypatch):
    ticks = iter([10.0, 12.5, 20.0, 20.25, 21.0, 30.0, 100.0, 103.0])
    monkeypatch.setattr(time, "monotonic", lambda: next(ticks))
    timer = PhaseTimer()
    with timer.phase("teacher fine-tune"):  # 10.0 -> 12.5
        pass
    with timer.phase("distill"):  # 20.0 -> 30.0, with "export" nested: 20.25 -> 21.0
        with timer.phase("export"):
            pass
    with pytest.raises(RuntimeError), timer.phase("teacher fine-tune"):  # 100 -> 103, ended by an error
        raise RuntimeError("boom")
    assert timer.seconds == {"teacher fine-tune": pytest.approx(5.5), "export": pytest.approx(0.75),
                             "distill": pytest.approx(10.0)}
    injected = PhaseTimer(clock=iter([1.0, 4.0]).__next__)
    with injected.phase("eval"):
        pass
    assert injected.seconds == {"eval": 3.0}
