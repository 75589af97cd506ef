"""A study over the teacher (no training: synthetic run summaries): rows run at one axis point only, the
grids of a two-axis study with the best teacher and the best-teaching teacher, and whether a teacher's
similarity information predicts the student's score better than the teacher's score."""

from __future__ import annotations

import json

import pytest

from kdforge.errors import KDForgeError
from kdforge.study.config import load_study
from kdforge.study.grid import expand
from kdforge.study.heatmap import best_cell, grid_tables, study_grids
from kdforge.study.stats import CONTRADICTED, HOLDS, UNDECIDED
from kdforge.study.teacher_measures import MIN_TEACHERS, compare, family_key, spearman

BATCH, EPOCHS = [8, 16], [1, 2, 3]
# the teacher's score and non-target entropy at (batch index, epoch index); the student learns best from
# the middle-epoch teachers, whose entropy is highest, not from the best teacher (batch 8, 3 epochs)
TEACHER = [[0.70, 0.80, 0.90], [0.65, 0.75, 0.85]]
ENTROPY = [[0.50, 0.80, 0.30], [0.45, 0.70, 0.20]]
STUDENT = [[0.60, 0.68, 0.58], [0.59, 0.66, 0.57]]


@pytest.fixture
def study_tree(job_tree, tmp_path) -> dict:
    job_tree["train"]["trackers"] = []
    return {"base": job_tree,
            "rows": {"ce": {"objectives": [{"name": "ce"}]},
                     "kd": {},
                     "ls": {"objectives": [{"name": "ce", "weight": 0.5},
                                           {"name": "teacher_confidence_ls", "weight": 0.5, "temperature": 2.0}]}},
            "axes": {"teacher.finetune.batch_size": BATCH, "teacher.finetune.epochs": EPOCHS},
            "single_point_rows": ["ce"], "seeds": [0, 1], "baseline": "ce",
            "claims": [{"a": "kd", "b": "ce"}], "output_dir": str(tmp_path / "study")}


def summary(run, i: int, j: int) -> dict:
    shift = {"ce": -0.05, "kd": 0.0, "ls": -0.02}[run.row]
    student = STUDENT[i][j] + shift + 0.01 * run.seed
    return {"row": run.row, "point": run.point, "seed": run.seed, "run_dir": "x", "task": "csv",
            "main_metric": "accuracy", "greater_is_better": True, "value": student,
            "student": {"accuracy": student, "ece": 0.05, "params": 1000},
            "teacher": {"accuracy": TEACHER[i][j], "non_target_entropy": ENTROPY[i][j],
                        "confusion_rank_correlation": None},
            "baseline": {"accuracy": 0.5}, "teacher_id": f"t{i}{j}", "other_roles": {}}


def summaries_of(runs) -> dict:
    out = {}
    for run in runs:
        config = run.config()
        i, j = BATCH.index(config.teacher.finetune.batch_size), EPOCHS.index(config.teacher.finetune.epochs)
        out[run.key] = summary(run, i, j)
    return out


def test_a_single_point_row_runs_at_the_first_point_only_and_leaves_the_other_runs_as_they_were(study_tree):
    runs = expand(*load_study(study_tree))
    assert len(runs) == 2 * 1 + 2 * 6 * 2  # ce: 1 point x 2 seeds; kd and ls: 6 points x 2 seeds
    assert {r.point for r in runs if r.row == "ce"} == {"teacher.finetune.batch_size=8, teacher.finetune.epochs=1"}
    plain = expand(*load_study({**study_tree, "single_point_rows": []}))
    assert {r.key: r.config_hash for r in runs if r.row != "ce"} == \
        {r.key: r.config_hash for r in plain if r.row != "ce"}  # the other rows' runs (and stored hashes) unchanged


@pytest.mark.parametrize("change, says", [
    ({"single_point_rows": ["nope"]}, "single_point_rows.0: 'nope' is not a row"),
    ({"axes": {}}, "single_point_rows run at the first axis point only, but the study has no `axes`"),
])
def test_bad_single_point_rows_are_one_line(study_tree, change, says):
    study_tree.update(change)
    with pytest.raises(KDForgeError) as err:
        load_study(study_tree)
    assert says in str(err.value) and "\n" not in str(err.value)


def test_grids_mark_the_best_teacher_and_the_best_teaching_teacher(study_tree):
    study, base = load_study(study_tree)
    runs = expand(study, base)
    from kdforge.study.report import StudyTables

    tables = StudyTables(study, runs, summaries_of(runs))
    grids = study_grids(study.axes, ["kd", "ls"], tables.own_cells(), "accuracy", True)
    assert grids["teacher"] == TEACHER
    assert grids["rows"]["kd"][0] == pytest.approx([v + 0.005 for v in STUDENT[0]])  # mean of seeds 0 and 1
    assert grids["best_teacher"] == (0, 2) and grids["best_teaching"] == {"kd": (0, 1), "ls": (0, 1)}
    tables_out = grid_tables(grids, "accuracy", lambda v: f"{100 * v:.1f}")
    title, headers, rows = tables_out[1]
    assert title.endswith("row kd") and headers == ["teacher.finetune.batch_size \\ teacher.finetune.epochs",
                                                    "1", "2", "3"]
    assert rows[0] == ["8", "60.5", "68.5 (best teaching)", "58.5 (best teacher)"]
    assert tables_out[0][2][0][3] == "90.0 (best teacher)"
    assert best_cell([[None, 2.0], [1.0, 2.0]], greater=True) == (0, 1)  # ties: the first in row-major order
    assert best_cell([[None, 2.0], [1.0, 2.0]], greater=False) == (1, 0)
    assert best_cell([[None]], greater=True) is None
    assert study_grids({"a": [1]}, ["kd"], {}, "accuracy", True) is None  # one axis: no grid


def test_the_report_of_a_teacher_grid(study_tree, tmp_path):
    from kdforge.study.report import write_study_report

    study, base = load_study(study_tree)
    runs = expand(study, base)
    report, _table = write_study_report(tmp_path / "out", study, runs, summaries_of(runs), "sqlite:///x.db")
    assert report["complete"] and tuple(report["grids"]["best_teacher"]) == (0, 2)
    last = [r for r in report["rows"] if r["point"] == "teacher.finetune.batch_size=16, teacher.finetune.epochs=3"]
    ce, kd = (next(r for r in last if r["row"] == name) for name in ("ce", "kd"))
    assert ce["seeds"] == [0, 1]  # the single-point row's runs, shown at every point
    assert kd["differs_in"] == ["objectives"]  # its teacher is immaterial to ce: not flagged as a second setting
    assert kd["difference"]["mean"] == pytest.approx(STUDENT[1][2] - (STUDENT[0][0] - 0.05))
    md = (tmp_path / "out" / "study.md").read_text()
    assert "best teaching" in md and "non-target entropy" in md and (tmp_path / "out" / "study-grid.png").is_file()
    assert (tmp_path / "out" / "study-grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    predictors = {(r["family"], r["measure"]): r for r in report["teacher_predictors"]}
    kd_entropy = predictors[("kd", "non_target_entropy")]
    assert kd_entropy["teachers"] == 6 and kd_entropy["n"] == 6
    students = [v for line in STUDENT for v in line]
    assert kd_entropy["rho_score"] == pytest.approx(spearman(students, [v for line in TEACHER for v in line]))
    assert kd_entropy["rho_measure"] == pytest.approx(spearman(students, [v for line in ENTROPY for v in line]))
    assert ("ce", "non_target_entropy") not in predictors  # one teacher: nothing to correlate
    assert ("kd", "confusion_rank_correlation") not in predictors  # no teacher has it (as with two classes)
    json.dumps(report)  # study.json is plain JSON


def points(student, score, measure):
    return [{"student": s, "score": a, "m": m} for s, a, m in zip(student, score, measure, strict=True)]


def test_spearman_and_the_predictor_rule():
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0) and spearman([1, 2], [1, 2]) is None
    assert spearman([1, 2, 3], [5, 5, 5]) is None
    few = compare(points([1, 2, 3, 4], [4, 3, 2, 1], [1, 2, 3, 4]), "m")
    assert few["verdict"] == UNDECIDED and f"at least {MIN_TEACHERS}" in few["why"] and few["rho_measure"] == 1.0
    student = list(range(10))
    unrelated = [3, 9, 1, 7, 5, 0, 8, 2, 6, 4]  # its rank correlation with the student's score is small
    better = compare(points(student, unrelated, student), "m")
    assert better["rho_measure"] == pytest.approx(1.0) and abs(better["rho_score"]) < 0.2
    assert better["verdict"] == HOLDS and better["low"] > 0
    worse = compare(points(student, student, unrelated), "m")
    assert worse["verdict"] == CONTRADICTED and worse["high"] < 0
    missing = compare([{"student": 1, "score": 1, "m": None}] * 6, "m")
    assert missing["n"] == 0 and missing["verdict"] == UNDECIDED


def test_a_family_is_the_runs_that_differ_in_their_teacher_only():
    one = {"teacher": {"model": "a"}, "train": {"seed": 0, "lr": 1}, "output_dir": "x", "objectives": [1]}
    two = {"teacher": {"model": "b"}, "train": {"seed": 1, "lr": 1}, "output_dir": "y", "objectives": [1]}
    assert family_key(one) == family_key(two)
    assert family_key(one) != family_key({**two, "objectives": [2]})
    assert one["train"]["seed"] == 0  # the job itself is left as it was
