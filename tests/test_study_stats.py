"""The statistics and the grid of ``kdforge study``: intervals by hand, the verdict rule, floors, the
expansion of rows x axes x seeds, the flag on comparisons that change two settings, bad studies refused."""

from __future__ import annotations

import math

import pytest

from kdforge.errors import KDForgeError
from kdforge.study.config import flatten, load_study
from kdforge.study.floors import teacher_floor
from kdforge.study.grid import differing_settings, expand
from kdforge.study.report import finding
from kdforge.study.stats import CONTRADICTED, HOLDS, UNDECIDED, paired_difference, t_interval, verdict


def test_t_interval_by_hand():
    iv = t_interval([1.0, 2.0, 3.0])  # mean 2, sample std 1, t_{0.975, 2} = 4.302653
    assert iv.mean == pytest.approx(2.0) and iv.std == pytest.approx(1.0)
    half = 4.302653 / math.sqrt(3)
    assert iv.low == pytest.approx(2.0 - half, abs=1e-5) and iv.high == pytest.approx(2.0 + half, abs=1e-5)
    assert iv.half_width == pytest.approx(half, abs=1e-5)
    single = t_interval([0.7])
    assert single.mean == 0.7 and single.low is None and single.half_width is None


def test_paired_difference_uses_shared_seeds_only():
    a = {0: 0.80, 1: 0.82, 2: 0.84, 3: 0.99}
    b = {0: 0.78, 1: 0.79, 2: 0.80}
    diff = paired_difference(a, b)  # seeds 0-2: differences 0.02, 0.03, 0.04
    assert diff.n == 3 and diff.mean == pytest.approx(0.03) and diff.std == pytest.approx(0.01)
    assert diff.low == pytest.approx(0.03 - 4.302653 * 0.01 / math.sqrt(3), abs=1e-6)
    assert paired_difference({0: 1.0}, {1: 1.0}) is None


@pytest.mark.parametrize("values, direction, expected", [
    ([0.02, 0.03, 0.04], "higher", HOLDS),          # the interval excludes 0 above
    ([0.02, 0.03, 0.04], "lower", CONTRADICTED),
    ([-0.02, -0.03, -0.04], "higher", CONTRADICTED),
    ([-0.02, -0.03, -0.04], "lower", HOLDS),
    ([0.05, -0.01, 0.03], "higher", UNDECIDED),     # mean > 0 but the interval holds 0
])
def test_verdict_rule(values, direction, expected):
    assert verdict(t_interval(values), direction) == expected


def test_one_seed_is_undecided():
    assert verdict(t_interval([0.5]), "higher") == UNDECIDED and verdict(None) == UNDECIDED


def test_findings_are_worded_from_the_numbers():
    diff = t_interval([0.05, -0.01, 0.03])
    record = {"claim": "kd beats ce", "point": "", "metric": "accuracy", "difference": diff.to_dict(),
              "verdict": verdict(diff), "paper": 1.5, "source": "Hinton 2015", "differs_in": ["objectives"]}
    line = finding(record)
    assert f"{100 * diff.mean:+.2f} pts" in line and UNDECIDED in line
    assert f"{100 * diff.half_width:.2f} pts" in line and "+1.50 pts (Hinton 2015)" in line
    holds = t_interval([0.02, 0.03, 0.04])
    line = finding({**record, "difference": holds.to_dict(), "verdict": verdict(holds),
                    "differs_in": ["objectives", "train.lr"]})
    assert ": holds" in line and "smallest" not in line and "2 settings (objectives, train.lr)" in line


def test_floors():
    assert teacher_floor("glue/sst2", "accuracy", 0.51).value == pytest.approx(0.61)
    assert teacher_floor("cifar10", "accuracy", 0.10).value == pytest.approx(0.85)  # the stricter one wins
    assert teacher_floor("glue/mrpc", "f1", 0.81).value == pytest.approx(0.86)
    assert teacher_floor("glue/cola", "mcc", 0.0).value == pytest.approx(0.20)
    assert teacher_floor("glue/stsb", "pearson", None).value == pytest.approx(0.50)
    assert teacher_floor("glue/sst2", "accuracy", 0.51, explicit=0.9).value == 0.9
    assert teacher_floor("lm", "perplexity", None).value is None
    floor = teacher_floor("glue/rte", "accuracy", 0.527)
    assert floor.clears(0.5523) is False and floor.clears(0.70) is True


@pytest.fixture
def study_tree(job_tree, tmp_path) -> dict:
    job_tree["train"]["trackers"] = []
    return {"base": job_tree, "rows": {"ce": {"objectives": [{"name": "ce"}]}, "kd": {}},
            "axes": {"train.epochs": [1, 2]}, "seeds": [3, 4], "baseline": "ce",
            "claims": [{"a": "kd", "b": "ce"}], "output_dir": str(tmp_path / "study")}


def test_expand_rows_axes_seeds(study_tree):
    study, base = load_study(study_tree)
    runs = expand(study, base)
    assert len(runs) == 2 * 2 * 2 and len({r.key for r in runs}) == 8
    assert len({r.tree["output_dir"] for r in runs}) == 8
    first = runs[0]
    assert (first.row, first.point, first.seed) == ("ce", "train.epochs=1", 3)
    config = first.config()
    assert config.train.seed == 3 and config.train.epochs == 1 and [o.name for o in config.objectives] == ["ce"]
    assert config.teacher.finetune.seed == 0  # pinned to the base's train.seed: one teacher for every seed
    assert {r.config().teacher.finetune.seed for r in runs} == {0}
    assert runs[0].config_hash != runs[2].config_hash  # another axis point


def test_differing_settings_counts_each_setting_once():
    a = {"train": {"lr": 1, "seed": 1, "epochs": 2}, "objectives": [{"name": "ce"}], "output_dir": "x"}
    b = {"train": {"lr": 2, "seed": 2, "epochs": 2}, "objectives": [{"name": "kd"}], "output_dir": "y"}
    assert differing_settings(a, b) == ["objectives", "train.lr"]  # seed and output folder are the run's own
    assert flatten({"a": {"b": {"c": 1}}, "d": [1]}) == {"a.b.c": 1, "d": [1]}


def test_differing_settings_names_a_section_one_job_lacks_once():
    one = {"teacher": {"model": "m", "finetune": {"seed": 0}}, "assistants": {}, "train": {"lr": 1}}
    three = {"teachers": {"t0": {"model": "m"}, "t1": {"model": "m"}}, "assistants": {"ta": {"model": "s"}},
             "train": {"lr": 1}}
    assert differing_settings(one, three) == ["assistants", "teacher", "teachers"]
    two = {**one, "teacher": {"model": "m", "finetune": {"seed": 1}}}
    assert differing_settings(one, two) == ["teacher.finetune.seed"]  # both have the section: the key itself


@pytest.mark.parametrize("change, says", [
    ({"baseline": "nope"}, "baseline 'nope' is not a row"),
    ({"claims": [{"a": "kd", "b": "x"}]}, "claims.0.b"),
    ({"seeds": [1, 1]}, "seeds must be distinct"),
    ({"rows": {"ce": {"train.lrr": 1}, "kd": {}}}, "train.lrr"),
    ({"colour": 1}, "colour"),
])
def test_bad_study_is_one_line(study_tree, change, says):
    study_tree.update(change)
    with pytest.raises(KDForgeError, match=None) as err:
        study, base = load_study(study_tree)
        expand(study, base)
    assert says in str(err.value) and "\n" not in str(err.value)


def test_a_published_teacher_score_in_another_metric_is_shown_beside_ours_on_it():
    from kdforge.study.config import PublishedScore
    from kdforge.study.report import published_cell

    teacher = {"metric": "f1", "scores": {"f1": 0.8644, "accuracy": 0.8015}}
    other = PublishedScore(value=0.889, source="MiniLM, Table 8", metric="accuracy")
    assert published_cell(other, teacher) == "accuracy 0.8890 (MiniLM, Table 8; this teacher 0.8015)"
    same = PublishedScore(value=0.9, source="a card")
    assert published_cell(same, teacher) == "0.9000 (a card)"


def test_a_runs_hash_ignores_settings_at_their_defaults_and_accepts_the_older_written_hash(study_tree):
    from kdforge.study.grid import RunSpec, digest

    study, base = load_study(study_tree)
    run = expand(study, base)[0]
    with_defaults = RunSpec(run.row, run.point, run.seed,
                            {**run.tree, "eval": {**run.tree.get("eval", {}), "ensembles": {}, "batch_size": 64}})
    assert with_defaults.config_hash == run.config_hash  # a default written out (or added to kdforge) changes nothing
    changed = RunSpec(run.row, run.point, run.seed, {**run.tree, "train": {**run.tree["train"], "lr": 0.5}})
    assert changed.config_hash != run.config_hash and not changed.matches(run.config_hash)
    older = digest({k: v for k, v in run.tree.items() if k != "output_dir"})  # how runs were stored before
    late = RunSpec(run.row, run.point, run.seed, {**run.tree, "eval": {**run.tree.get("eval", {}), "ensembles": {}}})
    assert run.matches(older) and late.matches(older) and run.matches(run.config_hash)  # a field added since
    assert not run.matches(None)
    written = RunSpec(run.row, run.point, run.seed, {**run.tree, "train": {**run.tree["train"], "momentum": 0.9}})
    by_user = digest({k: v for k, v in written.tree.items() if k != "output_dir"})  # the user wrote momentum
    assert written.matches(by_user)


def test_runs_stored_before_the_latency_length_default_changed_are_found(study_tree):
    """eval.latency_seq_len's default went from 64 tokens to null (the task's max_length): a stored run is
    found again whether its study left the length unset (kdforge wrote the former default into its tree) or
    pins the former default (a default then: out of its settings hash)."""
    from kdforge.study.grid import RunSpec, digest

    del study_tree["base"]["eval"]
    study, base = load_study({**study_tree, "overrides": {"eval.latency_repeats": 2}})  # fills the eval section
    run = expand(study, base)[0]
    assert run.tree["eval"]["latency_seq_len"] is None  # the default now, written out
    written_then = {k: v for k, v in run.tree.items() if k != "output_dir"}
    written_then = {**written_then, "eval": {**written_then["eval"], "latency_seq_len": 64}}
    assert run.matches(digest(written_then))  # the tree as kdforge wrote it before
    pinned = RunSpec(run.row, run.point, run.seed, {**run.tree, "eval": {**run.tree["eval"], "latency_seq_len": 64}})
    settings_then = pinned.config().model_dump(mode="json", exclude_defaults=True)
    settings_then.pop("output_dir")
    del settings_then["eval"]["latency_seq_len"]
    assert pinned.config_hash != run.config_hash and pinned.matches(digest(settings_then))
    other = RunSpec(run.row, run.point, run.seed, {**run.tree, "eval": {**run.tree["eval"], "latency_seq_len": 32}})
    assert not other.matches(digest(settings_then)) and not other.matches(run.config_hash)
