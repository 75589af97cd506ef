"""The worked examples of docs/design.md: a new strategy and a new data source are one file each in
recipes/ registered by name; they run through the engine untouched (caching, checkpoints, evaluation)
from a config. And the registries are the only lists: the docs name every registered strategy and
data source."""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import pytest

from kdforge import jobs
from kdforge.config import validate_config
from kdforge.errors import KDForgeError
from kdforge.recipes.base import DATA_SOURCES, STRATEGIES
from kdforge.recipes.catalog import check_stages, data_source_for, load_recipes

ROOT = Path(__file__).parent.parent
DESIGN = ROOT / "docs" / "design.md"


def documented_module(name: str) -> types.ModuleType:
    """Load ``src/kdforge/recipes/<name>.py`` exactly as the design doc shows it (once per process)."""
    module_name = f"kdforge.recipes.{name}"
    if module_name not in sys.modules:
        code = re.search(rf"```python\n# src/kdforge/recipes/{name}.py\n(.*?)```", DESIGN.read_text(), re.S).group(1)
        module = types.ModuleType(module_name)
        sys.modules[module_name] = module
        exec(compile(code, f"{name}.py", "exec"), module.__dict__)
    return sys.modules[module_name]


@pytest.fixture(scope="module")
def most_confident():
    documented_module("most_confident")
    return STRATEGIES.get("most_confident")


@pytest.fixture(scope="module")
def transfer_set():
    documented_module("transfer_set")
    return DATA_SOURCES.get("transfer_set")


def two_teachers(job_tree, tiny_teacher_dir, **stage) -> dict:
    return {**job_tree, "teacher": {"model": str(tiny_teacher_dir)},
            "teachers": {"t2": {"model": str(tiny_teacher_dir)}},
            "stages": [{"name": "distill", "objectives": [{"name": "ce"}], "strategy": {"name": "most_confident"},
                        **stage}]}


def test_the_documented_strategy_is_checked_like_every_strategy(job_tree, tiny_teacher_dir, most_confident):
    """It declares only how many teachers it takes: the base class checks that and the terms' roles."""
    check_stages(validate_config(two_teachers(job_tree, tiny_teacher_dir)))
    one = {**job_tree, "stages": [{"name": "distill", "objectives": [{"name": "ce"}],
                                   "strategy": {"name": "most_confident"}}]}
    with pytest.raises(KDForgeError, match=r"most_confident needs 2 or more teacher roles \(got teacher\)"):
        check_stages(validate_config(one))
    unbound = two_teachers(job_tree, tiny_teacher_dir, objectives=[{"name": "hinton_kd"}])
    with pytest.raises(KDForgeError, match="say which with `teacher: NAME`"):
        check_stages(validate_config(unbound))
    with pytest.raises(KDForgeError, match=r"most_confident.*`temprature`: this config key does not exist"):
        check_stages(validate_config(two_teachers(job_tree, tiny_teacher_dir, strategy={
            "name": "most_confident", "temprature": 2})))


@pytest.mark.slow
def test_the_documented_strategy_runs_from_a_config(tmp_path, job_tree, tiny_teacher_dir, most_confident):
    tree = two_teachers(job_tree, tiny_teacher_dir, strategy={"name": "most_confident", "temperature": 2.0})
    tree["teacher_cache"] = {"folder": str(tmp_path / "cache")}
    result = jobs.run_distill(validate_config(tree))
    assert result.student.metrics["accuracy"] > 0.5
    history = result.run_dir / "metrics.json"
    assert history.is_file()
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1  # both roles share one frozen model: one cache entry
    engine = Path(__file__).parent.parent / "src" / "kdforge" / "engine"
    assert not any("most_confident" in f.read_text() for f in engine.glob("*.py"))


def transfer_tree(job_tree, tmp_path, **stage) -> dict:
    passages = tmp_path / "extra.txt"
    passages.write_text("the film was good and long\nthe plot was dull\n\nawful acting\nwonderful story\n" * 8)
    return {**job_tree, "teacher": {"model": job_tree["teacher"]["model"]},
            "stages": [{"name": "transfer", "data": "transfer_set", "transfer_set": {"file": str(passages)},
                        "objectives": [{"name": "ce", "weight": 0.5}, {"name": "hinton_kd", "weight": 0.5}],
                        **stage}]}


def test_the_documented_data_source_builds_its_stage_data(tmp_path, job_tree, transfer_set):
    """Its parameters are checked by its own Params, its batches carry the teacher's labels, and a
    strategy that needs the task's own labels refuses it before training."""
    import numpy as np

    from kdforge.engine.predict import predict
    from kdforge.models.adapter import ModelAdapter
    from kdforge.models.loading import load_model
    from kdforge.tasks.base import build_task

    config = validate_config(transfer_tree(job_tree, tmp_path))
    check_stages(config)
    task = build_task(config.task)
    teacher = load_model(config.teacher.model, task)
    data = data_source_for(config.stages[0], 0).build(config.stages[0], task, teacher, config, "cpu")
    assert len(data.train) == 32 and data.carries == {"labels"} and data.num_labels == 2
    logits, labels = predict(ModelAdapter(teacher.model), data.train, data.collator(teacher.tokenizer), 16)
    assert (labels == np.asarray(logits).argmax(-1)).all()  # labelled by the teacher
    assert data.fingerprint.startswith(task.fingerprint()) and data.selection is not None

    with pytest.raises(KDForgeError, match=r"data source 'transfer_set' \(stages\.0\.transfer_set\): `fil`: this "
                                           "config key does not exist"):
        check_stages(validate_config(transfer_tree(job_tree, tmp_path, transfer_set={"file": "x", "fil": "y"})))
    peers = transfer_tree(job_tree, tmp_path, teachers=["peer"], objectives=[], strategy={"name": "dml"})
    peers["assistants"] = {"peer": {"layers": [1, 2]}}
    with pytest.raises(KDForgeError, match=r"strategy dml needs batches with the task's own labels .*which "
                                           r"`data: transfer_set` does not give; set stages\.0\.data: task"):
        check_stages(validate_config(peers))


@pytest.mark.slow
def test_the_documented_data_source_runs_from_a_config(tmp_path, job_tree, transfer_set):
    tree = transfer_tree(job_tree, tmp_path)
    tree["teacher_cache"] = {"folder": str(tmp_path / "cache")}
    result = jobs.run_distill(validate_config(tree))
    history = json.loads((result.run_dir / "metrics.json").read_text())["history"]
    assert len(history) == 2 and all("accuracy" in h for h in history)  # scored on the task each epoch
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1  # the teacher's outputs on it, cached


# ---------------------------------------------------------------------------- the registries are the lists


def shipped(registry) -> list[str]:
    """The registered names that come with kdforge (not those the tests register, e.g. the doc's examples)."""
    load_recipes()
    return [name for name in registry.names()
            if getattr(sys.modules[registry.get(name).__module__], "__file__", None) is not None]


@pytest.mark.parametrize("doc", ["README.md", "docs/design.md"])
def test_the_docs_name_every_registered_strategy_and_data_source(doc):
    text = (ROOT / doc).read_text()
    for name in [*shipped(STRATEGIES), *shipped(DATA_SOURCES)]:
        assert re.search(rf"`[^`\n]*\b{name}\b[^`\n]*`", text), f"{doc} does not name {name!r}"
    assert set(shipped(STRATEGIES)) >= {"offline", "dml", "soft_labels"}
    assert set(shipped(DATA_SOURCES)) == {"task", "ptp", "corpus", "fsbbt"}


def test_the_readme_strategy_table_lists_registered_strategies_only():
    readme = (ROOT / "README.md").read_text()
    table = re.search(r"\| strategy \| what \| paper \|\n\|---\|---\|---\|\n(.*?)\n\n", readme, re.S).group(1)
    listed = {re.match(r"\| `(\w+)`", row).group(1) for row in table.splitlines()}
    assert listed <= set(shipped(STRATEGIES)) and len(listed) >= 8


def test_no_hand_kept_name_list_in_the_code():
    """A strategy or data source is added by its own file alone: no module lists their names."""
    catalog = (ROOT / "src/kdforge/recipes/catalog.py").read_text()
    config = (ROOT / "src/kdforge/config.py").read_text()
    for name in ("multi_teacher", "assistant_ensemble", "soft_labels", "ptp", "fsbbt"):
        assert name not in catalog and f"`{name}`" not in config and f'"{name}"' not in config
