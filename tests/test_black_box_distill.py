"""Black-box teachers in whole jobs: a tiny BERT served over loopback HTTP distilled through the API and
the CLI (queries reported, scores equal to the local model's), kill and resume without a repeated query,
FS-BBT on digits with a registered callable, the budget running out, and `kdforge serve`."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import torch
import yaml

import kdforge
from kdforge import jobs
from kdforge.blackbox.clients import HttpTeacher
from kdforge.blackbox.protocol import canonical_json, decode_image, encode_image, encode_text
from kdforge.blackbox.query_cache import QueryCache
from kdforge.blackbox.serve import model_predictor, serve, server_url
from kdforge.blackbox.teacher import PROB_FLOOR, black_box_teacher, pixels_to_uint8
from kdforge.cli import main, parser
from kdforge.config import BlackBoxConfig, TaskConfig, validate_config
from kdforge.errors import KDForgeError
from kdforge.models.adapter import ModelAdapter
from kdforge.models.loading import load_model
from kdforge.roles.teachers import load_teacher
from kdforge.tasks.base import build_task
from tests.helpers import Killed, kill_at, tiny_bert

# ---------------------------------------------------------------------------- fixtures


class Counting:
    """A predict_fn that records the canonical JSON of every input it answers."""

    def __init__(self, fn):
        self.fn = fn
        self.seen: list[str] = []

    def __call__(self, items):
        self.seen += [canonical_json(item) for item in items]
        return self.fn(items)


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, tiny_teacher_dir):
    """A 2-layer tiny BERT with the teacher's tokenizer (a student of its own: the teacher is opaque)."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("student")
    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    tiny_bert(len(tokenizer), layers=2, seed=1).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def text_task_config(sentiment_dir) -> dict:
    return {"name": "csv", "train_file": str(sentiment_dir / "train.csv"), "dev_file": str(sentiment_dir / "dev.csv"),
            "max_length": 16, "train_limit": 48}


@pytest.fixture(scope="module")
def server(text_task_config, tiny_teacher_dir):
    """The tiny BERT teacher served over loopback HTTP; yields (url, the Counting predict_fn)."""
    task = build_task(TaskConfig(**text_task_config))
    counting = Counting(model_predictor(load_model(str(tiny_teacher_dir), task), task))
    http, thread = serve(counting, task.num_labels)
    yield server_url(http), counting
    http.shutdown()
    http.server_close()
    thread.join(5)


def text_tree(tmp_path, text_task_config, student_dir, url, **black_box) -> dict:
    return {"task": text_task_config,
            "teacher": {"black_box": {"url": url, "cache_dir": str(tmp_path / "answers"), **black_box}},
            "student": {"model": str(student_dir)},
            "objectives": [{"name": "ce", "weight": 0.5}, {"name": "hinton_kd", "weight": 0.5, "temperature": 2.0}],
            "train": {"epochs": 2, "batch_size": 16, "lr": 3e-3, "seed": 0, "device": "cpu", "trackers": []},
            "teacher_cache": {"folder": str(tmp_path / "teacher-outputs")},
            "eval": {"latency_batch_sizes": [2], "latency_seq_len": 16, "latency_repeats": 2, "latency_warmup": 1},
            "output_dir": str(tmp_path / "run")}


@pytest.fixture(scope="module")
def http_run(tmp_path_factory, text_task_config, student_dir, server):
    """One finished distillation from the served teacher (through the API, with ONNX export)."""
    url, counting = server
    tmp_path = tmp_path_factory.mktemp("http_run")
    tree = text_tree(tmp_path, text_task_config, student_dir, url)
    tree["export"] = {"onnx": True}
    before = len(counting.seen)
    result = kdforge.distill(tree)
    return result, counting.seen[before:], tree


# ---------------------------------------------------------------------------- text over HTTP


def test_served_teacher_distils_and_reports_its_queries(http_run, tiny_teacher_dir, text_task_config, one_thread):
    result, seen, tree = http_run
    run_dir = result.run_dir
    metrics = json.loads((run_dir / "metrics.json").read_text())
    task = build_task(TaskConfig(**text_task_config))
    n_train, n_dev = len(task.split("train")), len(task.split("dev"))
    assert len(seen) == len(set(seen))  # every input paid once
    distinct = {canonical_json(encode_text(e["text_a"])) for split in ("train", "dev") for e in task.split(split)}
    assert set(seen) == distinct  # the training texts (teacher cache) and the dev texts (evaluation)
    stats = metrics["black_box"]["teacher"]
    assert stats["queries_this_run"] == stats["queries_total"] == len(seen) <= n_train + n_dev
    assert stats["requests"] >= 2 and stats["round_trip_ms_median"] > 0
    line = f"black-box teacher `teacher` (black box url {tree['teacher']['black_box']['url']}): {len(seen)} queries"
    assert line in (run_dir / "report.md").read_text() and line in result.table

    # the served teacher's score in the report is the local model's
    local = load_model(str(tiny_teacher_dir), task)
    scores = task.evaluate(ModelAdapter(local.model.eval()), task.split("dev"), task.collator(local.tokenizer), 64)
    assert metrics["teacher"]["metrics"]["accuracy"] == pytest.approx(scores.metrics["accuracy"], abs=1e-9)
    assert metrics["teacher"]["ece"] == pytest.approx(scores.ece, abs=1e-4)
    assert metrics["teacher"]["params"] == 0 and metrics["teacher"]["latency"] == {}  # not timed: no budget spent
    assert (run_dir / "student" / "config.json").is_file()
    assert (run_dir / "exports" / "student.onnx").is_file() and not (run_dir / "exports" / "teacher.onnx").exists()
    assert set(metrics["exports"]) == {"student onnx fp32"}
    diff = metrics["provenance"]["config_diff"]  # from the defaults of a config with the same black box
    assert diff["teacher.black_box.cache_dir"] == tree["teacher"]["black_box"]["cache_dir"]
    assert "teacher.black_box.url" not in diff


def test_eval_and_bench_latency_of_a_black_box_run_pay_nothing(http_run, server, one_thread):
    result, _, _ = http_run
    _, counting = server
    before = len(counting.seen)
    again = jobs.run_eval(result.run_dir)  # the teacher's answers on the reported split are cached
    folder, table = jobs.run_bench_latency(result.run_dir)
    assert len(counting.seen) == before
    stats = json.loads((again.run_dir / "metrics.json").read_text())["black_box"]["teacher"]
    assert stats["queries_this_run"] == 0 and stats["cache_hits"] == 64 and stats["requests"] == 0
    assert again.teacher.metrics == result.teacher.metrics
    timed = json.loads((folder / "latency.json").read_text())["models"]
    assert set(timed) == {"student", "student onnx fp32"}
    teacher_row = next(line for line in table.splitlines() if line.startswith("teacher "))
    assert teacher_row.split("|")[-1].strip() == "n/a" and "teacher not timed" in table  # scored, never timed


def test_cli_distills_from_a_served_teacher(tmp_path, text_task_config, student_dir, server, capsys, one_thread):
    url, counting = server
    tree = text_tree(tmp_path, text_task_config, student_dir, url)
    tree["train"]["epochs"] = 1
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(tree))
    before = len(counting.seen)
    assert main(["distill", str(path)]) == 0
    out = capsys.readouterr().out
    queries = len(counting.seen) - before  # a new cache folder: the teacher is paid again
    assert f"black-box teacher `teacher` (black box url {url}): {queries} queries this run" in out
    stats = json.loads((tmp_path / "run" / "metrics.json").read_text())["black_box"]["teacher"]
    assert stats["queries_total"] == queries


def test_kill_and_resume_repeat_no_query(tmp_path, text_task_config, student_dir, server, one_thread):
    url, counting = server
    tree = text_tree(tmp_path, text_task_config, student_dir, url)
    tree["teacher_cache"] = {"enabled": False}  # the teacher runs live on every batch: the answer cache dedupes
    config = validate_config(tree)
    before = len(counting.seen)
    with pytest.raises(Killed):
        jobs.run_distill(config, callbacks=[kill_at(2)])
    paid_before_kill = len(counting.seen) - before
    assert paid_before_kill == 2 * 16  # two batches of new training texts, then the kill
    jobs.run_distill(config, resume=True)
    seen = counting.seen[before:]
    assert len(seen) == len(set(seen))  # the second epoch, the resumed batches, the evaluation: nothing paid twice
    stats = json.loads((tmp_path / "run" / "metrics.json").read_text())["black_box"]["teacher"]
    assert stats["queries_total"] == len(seen)
    assert stats["queries_this_run"] == len(seen) - paid_before_kill
    assert stats["cache_hits"] > 0


# ---------------------------------------------------------------------------- the module itself


def test_black_box_module_sends_the_raw_pixels_and_returns_log_probabilities(tmp_path):
    digits = build_task(TaskConfig(name="digits"))
    received: list[dict] = []

    def fn(items):
        received.extend(items)
        probs = np.full((len(items), 10), 0.0)
        probs[:, 3] = 1.0  # a zero probability elsewhere: logits floored, never -inf
        return probs

    loaded = black_box_teacher(BlackBoxConfig(callable="f", cache_dir=str(tmp_path)), digits, black_boxes={"f": fn})
    data = digits.split("test")
    batch = digits.collator(None, train=False)([data[i] for i in range(5)])
    logits = ModelAdapter(loaded.model)(batch).logits
    sent = np.stack([decode_image(item) for item in received])
    expected = np.stack([data[i]["image"].permute(2, 0, 1).numpy() for i in range(5)])
    np.testing.assert_array_equal(sent, expected)  # the task's uint8 images, channels first
    assert torch.equal(logits[:, 3], torch.zeros(5))
    assert torch.allclose(logits[:, 0], torch.full((5,), float(np.log(PROB_FLOOR))))
    # CIFAR-10's mean and std: the inverse normalisation is exact on every pixel value
    from kdforge.tasks.vision import CIFAR10_MEAN, CIFAR10_STD, normalize

    pixels = torch.arange(256, dtype=torch.uint8).repeat(3 * 4).view(4, 16, 16, 3)
    np.testing.assert_array_equal(pixels_to_uint8(normalize(pixels, CIFAR10_MEAN, CIFAR10_STD), CIFAR10_MEAN,
                                                  CIFAR10_STD), pixels.permute(0, 3, 1, 2).numpy())


# ---------------------------------------------------------------------------- FS-BBT on digits


@pytest.fixture(scope="module")
def digits_teacher():
    """A logistic regression on sklearn's digits as a black box over protocol images; records its inputs."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    digits = load_digits()
    x = np.rint(digits.images * (255 / 16)).reshape(len(digits.images), -1) / 255
    model = LogisticRegression(max_iter=300).fit(x, digits.target)
    return Counting(lambda items: model.predict_proba(np.stack([decode_image(i).reshape(-1) for i in items]) / 255))


def fsbbt_tree(tmp_path, **fsbbt) -> dict:
    return {"task": {"name": "digits", "train_limit": 40},
            "teacher": {"black_box": {"callable": "digits", "cache_dir": str(tmp_path / "answers")}},
            "student": {"model": "vision:small_cnn"},
            "stages": [{"name": "fewshot", "data": "fsbbt", "strategy": {"name": "soft_labels"}, "objectives": [],
                        "fsbbt": {"copies": 3, "cvae_epochs": 10, **fsbbt}}],
            "train": {"epochs": 8, "batch_size": 32, "lr": 3e-3, "seed": 0, "device": "cpu", "trackers": []},
            "eval": {"latency_batch_sizes": [2], "latency_repeats": 2, "latency_warmup": 1},
            "output_dir": str(tmp_path / "run")}


def test_fsbbt_builds_labels_and_learns_from_a_callable_black_box(tmp_path, digits_teacher, kdlog, one_thread):
    config = validate_config(fsbbt_tree(tmp_path))
    boxes = {"digits": digits_teacher}
    before = len(digits_teacher.seen)
    with pytest.raises(Killed):
        jobs.run_distill(config, callbacks=[kill_at(3)], black_boxes=boxes)
    built = len(digits_teacher.seen) - before
    stored = np.load(tmp_path / "run" / "stages" / "fewshot-fsbbt.npz", allow_pickle=False)
    originals, mixed, generated = (int(n) for n in stored["counts"])
    assert originals == 40 and mixed + generated == 3 * 40 and 0 < generated < 40  # dropped pairs -> CVAE images
    assert stored["images"].shape == (160, 8, 8, 1) and stored["images"].dtype == np.uint8
    probs = stored["probs"]
    assert probs.shape == (160, 10) and np.allclose(probs.sum(1), 1, atol=1e-5)  # every image labelled
    answers = np.asarray(digits_teacher.fn([encode_image(image.transpose(2, 0, 1)) for image in stored["images"]]))
    np.testing.assert_allclose(probs, answers, atol=1e-6)  # the teacher's answers on the stored pixels
    task = build_task(TaskConfig(name="digits", train_limit=40))
    few = np.stack([task.split("train")[i]["image"].numpy() for i in range(40)])
    np.testing.assert_array_equal(stored["images"][:40], few)  # the originals first
    assert built == len(set(digits_teacher.seen[before:])) == len({img.tobytes() for img in stored["images"]})

    kdlog.clear()
    result = jobs.run_distill(config, resume=True, black_boxes=boxes)
    test_size = len(task.split("test"))
    assert len(digits_teacher.seen) - before - built == test_size  # the resumed stage paid nothing; eval did
    assert any("FS-BBT set reused" in r.getMessage() for r in kdlog)
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert metrics["black_box"]["teacher"]["queries_this_run"] == test_size
    assert metrics["student"]["metrics"]["accuracy"] > 0.3  # chance is 0.1
    assert metrics["teacher"]["metrics"]["accuracy"] > 0.9


def test_fsbbt_ablation_flags_set_the_pool(tmp_path, digits_teacher):
    from kdforge.blackbox.teacher import black_box_teacher as make
    from kdforge.recipes.catalog import data_source_for

    config = validate_config(fsbbt_tree(tmp_path, mixup=False, cvae=False))
    task = build_task(config.task)
    teacher = make(config.teacher.black_box, task, black_boxes={"digits": digits_teacher})
    data = data_source_for(config.stages[0], 0).build(config.stages[0], task, teacher, config, "cpu")
    assert data.info["counts"] == {"originals": 40, "mixup": 0, "cvae": 0} and len(data.train) == 40
    assert data.carries == {"labels", "soft_labels"} and data.mixup_alpha == 1.0
    batch = data.collator(None, train=True)([data.train[i] for i in range(4)])
    assert batch["soft_labels"].shape == (4, 10) and batch["pixel_values"].shape == (4, 1, 8, 8)


def test_fsbbt_on_text_labels_tinybert_variants_and_trains_on_soft_labels(tmp_path, text_task_config, student_dir,
                                                                          one_thread):
    from kdforge.fsbbt.soft_labels import soft_cross_entropy
    from kdforge.recipes.catalog import data_source_for
    from kdforge.recipes.fsbbt import SoftLabelStep

    tree = text_tree(tmp_path, text_task_config, student_dir, "http://unused")
    tree["teacher"]["black_box"] = {"callable": "tests.test_black_box_distill:length_probs",
                                    "cache_dir": str(tmp_path / "answers")}
    tree["stages"] = [{"name": "fewshot", "data": "fsbbt", "strategy": {"name": "soft_labels"}, "objectives": [],
                       "fsbbt": {"augment": {"copies": 2, "p": 0.5}}}]
    config = validate_config(tree)
    task = build_task(config.task)
    teacher = load_teacher(config, task)
    assert teacher.tokenizer.get_vocab() == load_model(str(student_dir), task).tokenizer.get_vocab()
    source = data_source_for(config.stages[0], 0)
    data = source.build(config.stages[0], task, teacher, config, "cpu")
    assert data.info["counts"] == {"originals": 48, "augmented": 96, "cvae": 0} and data.mixup_alpha is None
    train = data.train
    texts = [train[i]["text_a"] for i in range(len(train))]
    assert texts[:48] == [task.split("train")[i]["text_a"] for i in range(48)]  # the originals first
    assert sum(a != b for a, b in zip(texts[48:96], texts[:48], strict=True)) > 10  # words replaced
    expected = length_probs([{"text": t} for t in texts])
    np.testing.assert_allclose(np.stack([train[i]["soft_labels"].numpy() for i in range(len(train))]), expected,
                               atol=1e-6)  # every text labelled by the black box
    paid = teacher.model.teacher.queries
    again = source.build(config.stages[0], task, teacher, config, "cpu")  # a resume: the stored set, no query
    assert teacher.model.teacher.queries == paid and again.info["counts"] == data.info["counts"]

    student = load_model(str(student_dir), task).model.eval()
    step = SoftLabelStep(ModelAdapter(student))
    batch = data.collator(teacher.tokenizer, train=True)([train[i] for i in range(50, 58)])
    loss, terms = step(batch, None)
    logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     token_type_ids=batch["token_type_ids"]).logits
    assert loss.item() == pytest.approx(soft_cross_entropy(logits, torch.from_numpy(expected[50:58]).float()).item(),
                                        abs=1e-6)


# ---------------------------------------------------------------------------- bad input


def cli_error(capsys, args: list[str]) -> str:
    """``kdforge ARGS`` in-process: exit status 2 and the one ``kdforge: error:`` line, no traceback."""
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("kdforge: error:")]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


def length_probs(items):
    """A module-level black box (``tests.test_black_box_distill:length_probs``): 2 classes from the text length."""
    z = np.array([[len(i["text"]) % 7, 3.0] for i in items])
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_exhausted_budget_is_one_line_and_keeps_the_paid_answers(tmp_path, text_task_config, student_dir, capsys):
    tree = text_tree(tmp_path, text_task_config, student_dir, "http://unused")
    tree["teacher"]["black_box"] = {"callable": "tests.test_black_box_distill:length_probs", "max_queries": 40,
                                    "cache_dir": str(tmp_path / "answers"), "batch_size": 8}
    tree["eval"]["batch_size"] = 32  # the teacher cache asks 32 texts at a time: 32 paid, then 16 more refused
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(tree))
    line = cli_error(capsys, ["distill", str(path)])
    assert line.startswith("kdforge: error: black-box teacher callable:")
    assert "max_queries 40 would be exceeded: 16 new inputs needed, 32 used" in line
    cache = QueryCache(tmp_path / "answers", "callable:tests.test_black_box_distill:length_probs#")
    assert len(cache) == 32 and cache.queries_total() == 32  # what was paid stays


@pytest.mark.parametrize("change, message", [
    ({"teacher": {"black_box": {"url": "http://127.0.0.1:9/"}}}, "http://127.0.0.1:9/ is unreachable"),
    ({"teacher": {"black_box": {"url": "ftp://x/"}}}, "is not an http:// or https:// URL"),
    ({"teacher": {"black_box": {"callable": "nobody"}}}, "callable 'nobody' is not a registered black box"),
    ({"teacher": {"black_box": {"file": "missing.jsonl"}}}, "file missing.jsonl does not exist"),
    ({"teacher": {"black_box": {"callable": "tests.test_black_box_distill:length_probs"}, "finetune": {}}},
     "a black-box teacher cannot be fine-tuned"),
    ({"student": {"layers": [0]}}, "a learner of a black-box teacher must be `student.model`"),
    ({"teacher": {"model": "MODEL"}, "stages": [{"name": "s", "data": "fsbbt", "objectives": []}]},
     "`data: fsbbt` is labelled by a black-box teacher"),
    ({"objectives": [{"name": "tinybert_hidden"}]}, "reads the hidden states, attention maps or module outputs"),
])
def test_bad_black_box_settings_are_one_line(tmp_path, text_task_config, student_dir, tiny_teacher_dir, capsys,
                                             change, message):
    tree = text_tree(tmp_path, text_task_config, student_dir, "http://unused")
    tree["teacher"] = {"black_box": {"callable": "tests.test_black_box_distill:length_probs"}}
    tree.update(change)
    if tree["teacher"].get("model") == "MODEL":
        tree["teacher"]["model"] = str(tiny_teacher_dir)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(tree))
    assert message in cli_error(capsys, ["distill", str(path)])
    assert not (tmp_path / "run").exists()  # refused before the run folder is written


def test_malformed_json_from_the_server_is_one_line(tmp_path, text_task_config, student_dir, capsys):
    from tests.test_blackbox import scripted

    with scripted([(200, b"<html>not json</html>")]) as (url, received):
        tree = text_tree(tmp_path, text_task_config, student_dir, url)
        path = tmp_path / "job.yaml"
        path.write_text(yaml.safe_dump(tree))
        line = cli_error(capsys, ["distill", str(path)])
    assert f"black-box teacher {url} answered with malformed JSON" in line and len(received) == 1


def test_cache_folder_that_is_a_file_is_refused_before_the_run(tmp_path, text_task_config, student_dir, capsys):
    (tmp_path / "answers").write_text("not a folder")
    tree = text_tree(tmp_path, text_task_config, student_dir, "http://unused")
    tree["teacher"]["black_box"] = {"callable": "tests.test_black_box_distill:length_probs",
                                    "cache_dir": str(tmp_path / "answers")}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(tree))
    assert "answers (teacher.black_box.cache_dir) is a file" in cli_error(capsys, ["distill", str(path)])


def test_wrong_answers_surface_as_one_line(tmp_path, text_task_config, student_dir):
    tree = text_tree(tmp_path, text_task_config, student_dir, "http://unused")
    tree["teacher"]["black_box"] = {"callable": "three", "cache_dir": str(tmp_path / "answers")}
    with pytest.raises(KDForgeError, match="returned 3 probabilities in row 0 but the task has 2 classes"):
        kdforge.distill(tree, black_boxes={"three": lambda items: np.full((len(items), 3), 1 / 3)})


# ---------------------------------------------------------------------------- kdforge serve


def test_kdforge_serve_serves_a_finished_run(http_run, monkeypatch, one_thread):
    import kdforge.blackbox.serve as serving

    result, _, _ = http_run
    args = parser().parse_args(["serve", str(result.run_dir), "--port", "0", "--role", "student"])
    assert (args.command, args.role, args.port, args.host) == ("serve", "student", 0, "127.0.0.1")
    started = []
    make = serving.make_server
    monkeypatch.setattr(serving, "make_server", lambda *a, **k: started.append(make(*a, **k)) or started[-1])
    codes = []
    thread = threading.Thread(target=lambda: codes.append(main(["serve", str(result.run_dir), "--port", "0"])))
    thread.start()
    deadline = time.monotonic() + 30
    while not started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        items = [encode_text("the movie was great"), encode_text("dull")]
        got = HttpTeacher(server_url(started[0]), 2).predict(items)
    finally:
        started[0].shutdown()
        thread.join(10)
    task = build_task(validate_config(http_run[2]).task)
    expected = model_predictor(load_model(str(result.run_dir / "student"), task), task)(items)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert codes == [0]
