"""A run's deployment forms, report and the commands around it, end to end on tiny models:
ONNX and int8 exports evaluated beside the PyTorch models, interleaved latency, the baseline row and
sanity warnings, provenance, the model card, dated re-evaluations, bench-latency and compare."""

from __future__ import annotations

import copy
import csv
import importlib.metadata
import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from kdforge import cli, jobs
from kdforge.config import validate_config
from kdforge.errors import KDForgeError
from kdforge.evaluation.compare import compare_runs, load_run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exported_run(tmp_path_factory, sentiment_dir, tiny_teacher_dir) -> Path:
    """One finished distill run with export.onnx and export.int8 (shared by the tests below: read only)."""
    return distilled(tmp_path_factory.mktemp("deploy") / "run", sentiment_dir, tiny_teacher_dir, epochs=2,
                     eval={"latency_seq_len": 16, "latency_repeats": 3}, export={"onnx": True, "int8": True})


def distilled(out: Path, sentiment_dir: Path, tiny_teacher_dir: Path, epochs: int, **sections) -> Path:
    """A finished distill run of the tiny teacher on the sentiment CSVs into ``out``; ``sections`` are added
    (``eval`` merged into the fast latency settings)."""
    tree = {
        "task": {"name": "csv", "train_file": str(sentiment_dir / "train.csv"),
                 "dev_file": str(sentiment_dir / "dev.csv"), "max_length": 16},
        "teacher": {"model": str(tiny_teacher_dir), "finetune": {"epochs": 3, "lr": 3e-3, "batch_size": 16}},
        "student": {"layers": [0, 3]},
        "train": {"epochs": epochs, "batch_size": 16, "lr": 3e-3, "seed": 0, "device": "cpu"},
        **sections,
        "eval": {"latency_batch_sizes": [1, 4], "latency_warmup": 1, **sections.get("eval", {})},
        "output_dir": str(out),
    }
    jobs.run_distill(validate_config(tree))
    return out


def test_every_form_is_exported_scored_and_timed(exported_run):
    run = exported_run
    for name in ("exports/teacher.onnx", "exports/student.onnx", "exports/student.int8.onnx", "student/README.md",
                 "report.html", "score-latency.png", "training.png", "reliability.png"):
        assert (run / name).is_file(), name
    saved = json.loads((run / "metrics.json").read_text())
    forms = saved["exports"]
    assert set(forms) == {"teacher onnx fp32", "student onnx fp32", "student onnx int8"}
    # parity: the fp32 ONNX files score exactly like the PyTorch models they came from
    assert forms["student onnx fp32"]["metrics"] == pytest.approx(saved["student"]["metrics"], abs=1e-9)
    assert forms["teacher onnx fp32"]["metrics"] == pytest.approx(saved["teacher"]["metrics"], abs=1e-9)
    assert forms["student onnx fp32"]["ece"] == pytest.approx(saved["student"]["ece"], abs=1e-4)
    # int8 weights: the file is several times smaller than the fp32 one; how it was made is recorded and said
    assert forms["student onnx int8"]["size_mb"] < 0.5 * forms["student onnx fp32"]["size_mb"]
    assert saved["int8"] == {"requested": "dynamic", "mode": "dynamic"}
    assert "student onnx int8: dynamic int8" in (run / "report.md").read_text()
    # one interleaved measurement, the teacher its reference: every other form has a speedup with an interval
    latency = saved["latency"]
    assert latency["reference"] == "teacher"
    assert set(latency["speedup"]) == {"student", *forms}
    for per_bs in latency["speedup"].values():
        assert set(per_bs) == {"1", "4"}
        for entry in per_bs.values():
            assert entry["low"] <= entry["ratio"] <= entry["high"]
    assert saved["student"]["latency"]["repeats"] == 3 and saved["student"]["latency"]["interleaved"]
    # the speedup of the summary is the interleaved one
    assert saved["comparison"]["speedup"]["4"] == pytest.approx(latency["speedup"]["student"]["4"]["ratio"])


def _labels(path: Path) -> list[str]:
    with path.open() as f:
        return [row["label"] for row in csv.DictReader(f)]


def test_report_has_baseline_per_class_provenance_and_plots(exported_run, sentiment_dir):
    saved = json.loads((exported_run / "metrics.json").read_text())
    # the majority-class baseline on the same 64 dev rows: the share of the most frequent training label
    train, dev = _labels(sentiment_dir / "train.csv"), _labels(sentiment_dir / "dev.csv")
    majority = Counter(train).most_common(1)[0][0]
    baseline = saved["baseline"]
    assert baseline["name"] == "majority class"
    assert baseline["metrics"]["accuracy"] == pytest.approx(dev.count(majority) / len(dev))
    assert saved["warnings"] == []  # the tiny teacher learned its keyword rule
    per_class = saved["student"]["per_class"]
    matrix = per_class["confusion_matrix"]
    assert sum(map(sum, matrix)) == 64
    assert sum(matrix[i][i] for i in range(len(matrix))) / 64 == pytest.approx(saved["student"]["metrics"]["accuracy"])
    provenance = saved["provenance"]
    assert provenance["versions"]["torch"] == importlib.metadata.version("torch")
    assert provenance["data"] == {"train": 256, "dev (reported)": 64}
    assert {"training stages", "export", "evaluation"} <= set(provenance["phases"])
    assert provenance["config_diff"]["export.onnx"] is True and provenance["config_diff"]["student"]["layers"] == [0, 3]
    # the history holds each loss term's epoch mean (ce and hinton_kd of the default objectives)
    assert {"loss:ce", "loss:hinton_kd"} <= set(saved["history"][0])
    page = (exported_run / "report.html").read_text()
    for words in ("Every model and form", "student onnx int8", "speedup [95% CI]", "majority class", "Per class",
                  "Confusion matrix", "Provenance", "<details><summary>full config", 'alt="training curves"',
                  'alt="score vs latency"'):
        assert words in page, words


def test_model_card_and_pipeline(exported_run):
    from huggingface_hub import ModelCard
    from transformers import pipeline

    card = ModelCard.load(exported_run / "student" / "README.md")
    saved = json.loads((exported_run / "metrics.json").read_text())
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results["accuracy"] == pytest.approx(saved["student"]["metrics"]["accuracy"])
    classify = pipeline("text-classification", model=str(exported_run / "student"), device="cpu")
    assert classify("a great film")[0]["label"] in {"LABEL_0", "LABEL_1", "neg", "pos", "0", "1",
                                                    *classify.model.config.id2label.values()}


def test_eval_writes_a_new_dated_folder_and_keeps_the_run(exported_run, capsys):
    before = (exported_run / "metrics.json").read_bytes()
    assert cli.main(["eval", str(exported_run), "--set", "eval.latency_repeats=2"]) == 0
    assert cli.main(["eval", str(exported_run), "--set", "eval.latency_repeats=2"]) == 0
    folders = sorted((exported_run / "evaluations").iterdir())
    assert len(folders) == 2 and all((f / "metrics.json").is_file() and (f / "report.html").is_file()
                                     for f in folders)
    assert (exported_run / "metrics.json").read_bytes() == before
    again = json.loads((folders[-1] / "metrics.json").read_text())
    assert again["student"]["metrics"] == json.loads(before)["student"]["metrics"]
    assert set(again["exports"]) == {"teacher onnx fp32", "student onnx fp32", "student onnx int8"}  # found on disk
    assert "evaluations" in capsys.readouterr().out


def test_bench_latency_re_measures_every_form(exported_run, capsys):
    assert cli.main(["bench-latency", str(exported_run), "--set", "eval.latency_repeats=2"]) == 0
    [folder] = list((exported_run / "latency").iterdir())
    measured = json.loads((folder / "latency.json").read_text())
    assert set(measured["models"]) == {"teacher", "student", "teacher onnx fp32", "student onnx fp32",
                                       "student onnx int8"}
    assert measured["models"]["student"]["repeats"] == 2
    assert "student onnx int8" in capsys.readouterr().out and (folder / "latency.md").is_file()


def test_compare_two_runs(exported_run, tmp_path, capsys):
    other = tmp_path / "other"
    tree = validate_config(json.loads(json.dumps(_config_tree(exported_run)))).model_dump()
    tree.update(output_dir=str(other), export={"onnx": False, "int8": False})
    tree["student"]["layers"] = [0]
    jobs.run_distill(validate_config(tree))
    out = tmp_path / "cmp"
    assert cli.main(["compare", str(exported_run), str(other), "--out", str(out)]) == 0
    page = (out / "compare.html").read_text()
    assert "student.layers" in page and "export.onnx" in page and "<img" in page
    assert str(out / "compare.html") in capsys.readouterr().out


def _config_tree(run: Path) -> dict:
    import yaml

    return yaml.safe_load((run / "config.yaml").read_text())


def test_a_teacher_that_answers_one_class_is_flagged(tmp_path, job_tree, tiny_teacher_dir, capsys):
    """The issue's MRPC case: a teacher that predicts the same class for every row must not be reported as
    a success (its retention would read 100%): a warning heads the report, the table and the log."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    stuck = tmp_path / "stuck_teacher"
    model = AutoModelForSequenceClassification.from_pretrained(tiny_teacher_dir)
    with torch.no_grad():
        model.classifier.bias.copy_(torch.tensor([50.0, -50.0]))
    model.save_pretrained(stuck)
    AutoTokenizer.from_pretrained(tiny_teacher_dir).save_pretrained(stuck)
    tree = copy.deepcopy(job_tree)
    tree["teacher"] = {"model": str(stuck)}
    tree["train"]["epochs"] = 1
    result = jobs.run_distill(validate_config(tree))
    saved = json.loads((Path(tree["output_dir"]) / "metrics.json").read_text())
    assert any(w.startswith("teacher predicts") and "for all 64 rows" in w for w in saved["warnings"])
    assert any(w.startswith("teacher: accuracy") and "no better than the majority-class baseline" in w
               for w in saved["warnings"])
    assert result.table.startswith("WARNING: ")
    report = (Path(tree["output_dir"]) / "report.md").read_text().splitlines()
    assert report[2].startswith("**Warning: teacher")  # right under the title


def test_compare_takes_each_runs_newest_bench_latency(exported_run, tmp_path):
    from kdforge.evaluation.compare import load_run

    measured = sorted((exported_run / "latency").glob("*/latency.json"))
    if not measured:  # this test may run alone: measure once
        assert cli.main(["bench-latency", str(exported_run), "--set", "eval.latency_repeats=2"]) == 0
        measured = sorted((exported_run / "latency").glob("*/latency.json"))
    timing = json.loads(measured[-1].read_text())
    metrics, _ = load_run(exported_run)
    assert metrics["latency_from"] == str(measured[-1].parent.relative_to(exported_run))
    assert metrics["student"]["latency"] == timing["models"]["student"]
    assert metrics["exports"]["student onnx int8"]["latency"] == timing["models"]["student onnx int8"]


def test_the_printed_table_flags_a_noisy_latency_measurement(exported_run):
    from kdforge.evaluation.run_report import result_table

    saved = json.loads((exported_run / "metrics.json").read_text())
    saved["latency"].update(noisy=True, noisy_reasons=["machine load 5.0 on 2 CPUs"])
    last = result_table(saved).splitlines()[-1]
    assert last.startswith("WARNING: latency noisy: machine load 5.0 on 2 CPUs") and "bench-latency" in last
    saved["latency"].update(noisy=False, noisy_reasons=[])
    assert "WARNING" not in result_table(saved)


# --------------------------------------------------------------------------- what the report says (issue 24)

INT8 = "student onnx int8"


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory, sentiment_dir, tiny_teacher_dir) -> Path:
    """A finished run distilled without ONNX, its latency left at the default length (task.max_length 16)."""
    return distilled(tmp_path_factory.mktemp("plain") / "run", sentiment_dir, tiny_teacher_dir, epochs=1,
                     eval={"latency_repeats": 2})


def _row(table: str, name: str) -> list[str]:
    """The cells of the first row of a plain-text or Markdown table that starts with ``name``."""
    line = next(line for line in table.splitlines() if line.strip("| ").startswith(f"{name} ")
                or line.strip("| ").startswith(f"{name}|"))
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _section(markdown: str, heading: str) -> str:
    return markdown.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]


def test_latency_is_timed_at_the_runs_max_length_and_said(plain_run):
    saved = json.loads((plain_run / "metrics.json").read_text())
    for name in ("teacher", "student"):
        assert saved[name]["latency"]["inputs"] == {"seq_len": 16}  # task.max_length, not 64
    said = "sequence length 16 tokens, batch sizes 1 and 4"
    assert said in jobs.finished_result(jobs.RunFolder(plain_run)).table
    assert said in (plain_run / "report.md").read_text() and said in (plain_run / "student/README.md").read_text()


def test_a_later_export_shows_in_the_table_the_runs_report_the_card_and_compare(plain_run, tmp_path, capsys):
    metrics_before = (plain_run / "metrics.json").read_bytes()
    teacher_vs_student = _section((plain_run / "report.md").read_text(), "Teacher vs student")
    assert INT8 not in (plain_run / "report.md").read_text()
    assert cli.main(["export", str(plain_run), "--int8", "--set", "eval.latency_repeats=2"]) == 0
    printed = capsys.readouterr().out
    [evaluation] = (plain_run / "evaluations").iterdir()
    scored = json.loads((evaluation / "metrics.json").read_text())
    int8 = scored["exports"][INT8]
    # the printed table: a row per form with score, ECE, params, MB and latency, and its speedup with an interval
    for name in ("teacher", "student", "teacher onnx fp32", "student onnx fp32", INT8):
        cells = _row(printed, name)
        assert len(cells) == 7 and all(c != "n/a" for c in cells[1:]), cells
    assert _row(printed, INT8)[1] == f"{int8['metrics']['accuracy']:.4f}"
    speedup = scored["latency"]["speedup"][INT8]["1"]
    assert f"{speedup['ratio']:.2f}x [{speedup['low']:.2f}-{speedup['high']:.2f}]" in printed
    # the run's own report: the newest forms first, saying where and when; the training-time results kept
    report = (plain_run / "report.md").read_text()
    assert report.index("## Newest measurements") < report.index("## Teacher vs student")
    newest = _row(_section(report, "Newest measurements"), INT8)
    assert newest[1] == f"{int8['metrics']['accuracy']:.4f}" and f"{evaluation.relative_to(plain_run)} (" in newest[-1]
    assert _section(report, "Teacher vs student") == teacher_vs_student
    assert (plain_run / "metrics.json").read_bytes() == metrics_before
    assert "Newest measurements" in (plain_run / "report.html").read_text()
    card = (plain_run / "student/README.md").read_text()
    assert "student.int8.onnx" in card and "### ONNX and int8" in card
    # compare: the run's newest forms
    markdown = compare_runs([plain_run], tmp_path / "cmp")["markdown"].read_text()
    header, _, row = _section(markdown, "Runs").strip().splitlines()[:3]
    cells = dict(zip(header.split("|"), row.split("|"), strict=True))
    assert cells[f" {INT8} b1 (ms) "].strip() == f"{int8['latency']['batch_sizes']['1']['median_ms']:.2f}"
    # distill --resume on the finished run prints its newest table too, the int8 row included
    assert _row(jobs.finished_result(jobs.RunFolder(plain_run)).table, INT8)[1] == f"{int8['metrics']['accuracy']:.4f}"


def test_a_later_bench_latency_updates_the_latencies_at_its_length(plain_run, capsys):
    if not (plain_run / "exports" / "student.int8.onnx").is_file():  # this test may run alone
        assert cli.main(["export", str(plain_run), "--int8", "--set", "eval.latency_repeats=2"]) == 0
    assert cli.main(["bench-latency", str(plain_run), "--set", "eval.latency_repeats=2",
                     "--set", "eval.latency_seq_len=8"]) == 0
    printed = capsys.readouterr().out
    [folder] = (plain_run / "latency").iterdir()
    timing = json.loads((folder / "latency.json").read_text())
    assert {m["inputs"]["seq_len"] for m in timing["models"].values()} == {8}  # an explicit length wins
    where = folder.relative_to(plain_run).as_posix()
    median = f"{timing['models'][INT8]['batch_sizes']['1']['median_ms']:.2f}"
    cells = _row(printed, INT8)
    assert cells[1] != "n/a" and cells[5] == median  # the export's score beside the new latency
    assert "sequence length 8 tokens, batch sizes 1 and 4" in printed and f"latency from {where}" in printed
    newest = _row(_section((plain_run / "report.md").read_text(), "Newest measurements"), INT8)
    assert newest[5] == median and newest[-1].startswith(f"{where} (")
    metrics, _ = load_run(plain_run)
    assert metrics["exports"][INT8]["latency"] == timing["models"][INT8]


def test_a_failed_evaluation_leaves_the_runs_report_as_it_was(plain_run, tmp_path, monkeypatch):
    import shutil

    run = shutil.copytree(plain_run, tmp_path / "run")
    before = {name: (run / name).read_bytes() for name in ("report.md", "report.html", "metrics.json")}

    def killed(config, task, models, teacher_role, out_dir, *args, **kwargs):
        out_dir.mkdir(parents=True)
        (out_dir / "report.md").write_text("half")  # what a kill in the middle of an evaluation leaves
        raise KDForgeError("evaluation failed")

    monkeypatch.setattr(jobs, "evaluate_run", killed)
    assert cli.main(["eval", str(run)]) == 2
    assert {name: (run / name).read_bytes() for name in before} == before
    partial = {f"evaluations/{f.name}" for f in (run / "evaluations").iterdir() if not (f / "metrics.json").exists()}
    assert partial and not partial & set(load_run(run)[0].get("measured_again", []))  # an incomplete one is not used


def test_the_card_of_a_run_says_its_hardware_speedup_and_onnx_files(exported_run):
    saved, _ = load_run(exported_run)  # its newest numbers: other tests may have measured it again
    card = (exported_run / "student/README.md").read_text()
    source, latency = saved["measured"]["student"]["latency"], saved["student"]["latency"]
    hardware = f"{source['cpu']} ({source['logical_cpus']} logical CPUs), {latency['threads']} torch thread"
    assert f"on {hardware}" in card
    for bs, entry in saved["latency"]["speedup"]["student"].items():
        assert (f"| {bs} | {latency['batch_sizes'][bs]['median_ms']:.2f} | "
                f"{entry['ratio']:.2f}x [{entry['low']:.2f}-{entry['high']:.2f}] |") in card
    assert "sequence length 16 tokens" in card and "`student.int8.onnx`" in card and "`student.onnx`" in card


def test_the_demo_headline_has_the_int8_student(tmp_path, job_tree, monkeypatch, capsys):
    import yaml

    from kdforge.config import load_config

    demo = load_config(cli.demo_config_path())
    assert demo.export.int8 and demo.eval.latency_seq_len is None  # the shipped form; timed at max_length
    tiny = tmp_path / "demo.yaml"
    job_tree["train"]["epochs"] = 1
    tiny.write_text(yaml.safe_dump({**job_tree, "export": {"onnx": True, "int8": True}}))
    monkeypatch.setattr(cli, "demo_config_path", lambda: str(tiny))
    assert cli.main(["demo"]) == 0
    printed = capsys.readouterr().out
    saved = json.loads((Path(job_tree["output_dir"]) / "metrics.json").read_text())
    int8 = saved["exports"][INT8]
    cells = _row(printed, INT8)  # score, ECE, params, MB on disk, latency b1, b4
    assert cells[1] == f"{int8['metrics']['accuracy']:.4f}" and cells[4] == f"{int8['size_mb']:.2f}"
    assert cells[5] == f"{int8['latency']['batch_sizes']['1']['median_ms']:.2f}"
    speedup = [c for c in printed.splitlines() if c.startswith(INT8) and "x [" in c]
    entry = saved["latency"]["speedup"][INT8]["4"]
    assert speedup and f"{entry['ratio']:.2f}x [{entry['low']:.2f}-{entry['high']:.2f}]" in speedup[0]
