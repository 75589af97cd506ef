"""The newer surfaces (several teachers, stage chains, search, study, serve, compare, eval) refuse what
cannot work in one line, before training or binding a port, instead of a traceback or a run that exits 0
having done something else."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import yaml

from kdforge import jobs
from kdforge.cli import main
from kdforge.config import validate_config
from kdforge.errors import KDForgeError
from kdforge.recipes.catalog import check_stages

pytestmark = pytest.mark.usefixtures("one_thread")


def one_line_error(capsys, argv: list[str]) -> str:
    """The command fails with exit status 2 and one error line (log lines before it are progress)."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("kdforge: error:")]
    assert len(errors) == 1 and "Traceback" not in err
    return errors[0]


def two_teachers(job_tree: dict) -> dict:
    tree = copy.deepcopy(job_tree)
    model = tree.pop("teacher")["model"]
    tree["teachers"] = {"t1": {"model": model}, "t2": {"model": model}}
    return tree


# ------------------------------------------------------------------------------------------- stages


def test_a_stage_naming_one_teacher_twice_is_refused(job_tree):
    tree = two_teachers(job_tree)
    tree["stages"] = [{"name": "distill", "teachers": ["t1", "t1"], "objectives": [{"name": "ce"}],
                       "strategy": {"name": "multi_teacher", "weighting": "average"}}]
    with pytest.raises(KDForgeError, match=r"stages.0.teachers lists 't1' twice"):
        validate_config(tree)


def test_a_stage_learning_from_an_assistant_trained_only_later_is_refused(job_tree):
    tree = copy.deepcopy(job_tree)
    tree["assistants"] = {"ta": {"layers": [0, 1, 2]}}
    kd = [{"name": "ce", "weight": 0.5}, {"name": "hinton_kd", "weight": 0.5}]
    tree["stages"] = [{"name": "student", "teachers": ["ta"], "objectives": kd},
                      {"name": "assistant", "learner": "ta", "teachers": ["teacher"], "objectives": kd}]
    with pytest.raises(KDForgeError, match=r"learns from assistant 'ta', which stage 'assistant' \(stages.1\) "
                                           r"trains only afterwards"):
        check_stages(validate_config(tree))
    tree["stages"].reverse()  # the assistant first: fine
    tree["stages"][-1]["name"], tree["stages"][0]["name"] = "student", "assistant"
    check_stages(validate_config(tree))


def test_a_black_box_teacher_given_to_a_strategy_that_reads_inside_teachers_is_named(job_tree, tmp_path):
    tree = two_teachers(job_tree)
    tree["teachers"]["t2"] = {"black_box": {"file": str(tmp_path / "answers.jsonl")}}
    tree["stages"] = [{"name": "distill", "objectives": [{"name": "ce"}], "strategy": {"name": "multi_teacher"}}]
    with pytest.raises(KDForgeError, match=r"reads the features before their classifier .* 't2' is a black box"):
        check_stages(validate_config(tree))
    tree["stages"][0]["strategy"]["weighting"] = "average"  # logits only: fine
    check_stages(validate_config(tree))
    sokd = copy.deepcopy(job_tree)
    sokd["teacher"] = {"black_box": {"file": str(tmp_path / "answers.jsonl")}}
    sokd["stages"] = [{"name": "distill", "objectives": [{"name": "ce"}], "strategy": {"name": "sokd"}}]
    with pytest.raises(KDForgeError, match=r"strategy sokd reads the output of its last stage but one"):
        check_stages(validate_config(sokd))


# ------------------------------------------------------------------------------------------- search


@pytest.fixture
def search_tree(job_tree, tmp_path) -> dict:
    tree = copy.deepcopy(job_tree)
    tree.pop("student")
    tree["train"]["trackers"] = []
    tree["search"] = {"method": "random", "trials": 2, "proxy_rows": 32, "proxy_epochs": 1, "latency_repeats": 1,
                      "final_top": 0, "space": {"layers": [1, 2], "hidden_size": [], "head_dim": [],
                                                "intermediate_size": [], "temperature": [], "kd_weight": []}}
    tree["output_dir"] = str(tmp_path / "search")
    return tree


def test_an_empty_search_space_is_refused_before_any_trial(search_tree, tmp_path, capsys):
    search_tree["search"]["space"]["layers"] = []
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(search_tree))
    err = one_line_error(capsys, ["search", str(path)])
    assert "every dimension is [] (nothing to search)" in err
    assert not (tmp_path / "search" / "study.db").exists() or not list((tmp_path / "search").glob("work/*"))


@pytest.mark.parametrize("change, message", [
    ({"space": {"layers": [2, 9]}}, "search.space.layers: 9 layers but the teacher has 4"),
    ({"candidate_objectives": [{"name": "no_such_term"}]}, "search.candidate_objectives.0.name"),
])
def test_a_space_the_teacher_cannot_fill_or_a_bad_term_is_refused_before_any_trial(search_tree, tmp_path, capsys,
                                                                                    change, message):
    search_tree["search"]["space"].update(change.get("space", {}))
    search_tree["search"].update({k: v for k, v in change.items() if k != "space"})
    search_tree["teacher"].pop("finetune")  # nothing to fine-tune: the check comes before any training
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(search_tree))
    err = one_line_error(capsys, ["search", str(path)])
    assert message in err
    assert not list((tmp_path / "search").glob("work/trial-*"))


def test_joining_a_search_or_study_that_does_not_exist_is_refused(search_tree, tmp_path, capsys):
    search_tree["teacher"].pop("finetune")
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(search_tree))
    err = one_line_error(capsys, ["search", str(path), "--join"])
    assert "--join: there is no search named 'search'" in err and "without --join" in err
    study = {"base": {k: v for k, v in search_tree.items() if k != "search"} | {"student": {"layers": [0, 3]}},
             "rows": {"a": {}}, "seeds": [0], "output_dir": str(tmp_path / "study")}
    study_path = tmp_path / "study.yaml"
    study_path.write_text(yaml.safe_dump(study))
    err = one_line_error(capsys, ["study", str(study_path), "--join"])
    assert "--join: there is no study named 'study'" in err


# ------------------------------------------------------------------------------------------- serve, compare, eval


def test_serve_refuses_a_port_out_of_range(capsys, tmp_path):
    err = one_line_error(capsys, ["serve", str(tmp_path), "--port", "70000"])
    assert "--port 70000: a TCP port is 0 to 65535" in err


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, sentiment_dir, tiny_teacher_dir) -> Path:
    out = tmp_path_factory.mktemp("hardening") / "run"
    tree = {"task": {"name": "csv", "train_file": str(sentiment_dir / "train.csv"),
                     "dev_file": str(sentiment_dir / "dev.csv"), "max_length": 16},
            "teacher": {"model": str(tiny_teacher_dir), "finetune": {"epochs": 1, "lr": 3e-3, "batch_size": 32}},
            "student": {"layers": [0, 3]},
            "train": {"epochs": 1, "batch_size": 32, "lr": 3e-3, "seed": 0, "device": "cpu", "trackers": []},
            "eval": {"latency_batch_sizes": [1], "latency_seq_len": 16, "latency_repeats": 1, "latency_warmup": 0},
            "output_dir": str(out)}
    jobs.run_distill(validate_config(tree))
    return out


def test_compare_refuses_a_file_as_its_out_folder(finished_run, tmp_path, capsys):
    target = tmp_path / "taken.txt"
    target.write_text("mine")
    err = one_line_error(capsys, ["compare", str(finished_run), "--out", str(target)])
    assert "is a file, not a folder" in err and target.read_text() == "mine"


def test_compare_refuses_runs_with_different_label_spaces(finished_run, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(finished_run, other)
    metrics = json.loads((other / "metrics.json").read_text())
    metrics["student"]["per_class"]["labels"] = ["a", "b", "c"]
    (other / "metrics.json").write_text(json.dumps(metrics))
    err = one_line_error(capsys, ["compare", str(finished_run), str(other), "--out", str(tmp_path / "cmp")])
    assert "different label spaces cannot be compared" in err and "a, b, c" in err


def test_eval_never_substitutes_the_base_model_for_a_missing_fine_tuned_teacher(finished_run, tmp_path, capsys):
    copy_of_run = tmp_path / "run"
    shutil.copytree(finished_run, copy_of_run)
    config = yaml.safe_load((copy_of_run / "config.yaml").read_text())
    config["output_dir"] = str(copy_of_run)
    (copy_of_run / "config.yaml").write_text(yaml.safe_dump(config))
    shutil.rmtree(copy_of_run / "teacher" / "model")
    err = one_line_error(capsys, ["eval", str(copy_of_run)])
    assert "fine-tuned its teacher 'teacher'" in err and "which is gone" in err and "kdforge finetune" in err


def test_version(capsys):
    import kdforge

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"kdforge {kdforge.__version__}"


def test_a_student_layer_the_teacher_lacks_is_refused_before_the_teachers_fine_tuning(job_tree, capsys, tmp_path):
    job_tree["student"] = {"layers": [0, 9]}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job_tree))
    err = one_line_error(capsys, ["distill", str(path)])
    assert "student.layers: 9 is not a layer of the teacher, which has 4 (indices 0 to 3)" in err
    assert not (Path(job_tree["output_dir"]) / "teacher").exists()  # nothing fine-tuned


def test_kdforge_quiets_the_libraries_progress_bars():
    from transformers.utils import logging as hf_logging

    from kdforge.console import setup_logging

    hf_logging.enable_progress_bar()
    setup_logging()
    assert not hf_logging.is_progress_bar_enabled()


def test_eval_on_another_file_names_it_and_keeps_the_runs_own_selection_split(finished_run, tmp_path, sentiment_dir):
    """The run selected its best epoch on dev.csv; scoring test.csv later is not "the same split"."""
    from tests.helpers import sentiment_rows, write_csv

    test_file = write_csv(tmp_path / "test.csv", sentiment_rows(40, seed=9))
    result = jobs.run_eval(finished_run, [f"task.dev_file={test_file}"])
    saved = json.loads((result.run_dir / "metrics.json").read_text())
    original = json.loads((finished_run / "metrics.json").read_text())
    assert saved["reported_on"] == "dev (test.csv, 40 rows)"
    assert saved["selected_on"] == original["selected_on"] == "dev (dev.csv, 64 rows)"
    assert "optimistic" not in (result.run_dir / "report.md").read_text()


def test_config_explain_lists_a_sections_keys_with_defaults_and_meaning(capsys):
    assert main(["config", "--explain", "train"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "train"
    assert "  optimizer (Literal['adamw', 'sgd']; default 'adamw'): adamw (the transformer papers')" in out
    assert "  scheduler (Literal['linear', 'cosine', 'constant']; default 'linear')" in out
    assert main(["config", "--explain", "teachers"]) == 0
    assert "  finetune (FinetuneConfig | None; default None)" in capsys.readouterr().out  # a dict's sections
    err = one_line_error(capsys, ["config", "--explain", "trian"])
    assert "`trian` is not a config section; sections here: task, teacher, teachers" in err
