"""Black-box teachers: the JSON protocol, the HTTP/callable/file clients against real loopback servers,
the SQLite answer cache with its query budget, and serving a kdforge model."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from threading import Thread

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from kdforge.blackbox.clients import BlackBoxClient, CallableTeacher, FileTeacher, HttpTeacher
from kdforge.blackbox.protocol import (
    check_probabilities,
    decode_image,
    encode_image,
    encode_text,
    input_key,
)
from kdforge.blackbox.query_cache import BudgetedTeacher, QueryCache
from kdforge.blackbox.serve import model_predictor, run_predictor, serve, server_url
from kdforge.config import TaskConfig
from kdforge.errors import KDForgeError
from kdforge.models.loading import LoadedModel, load_model
from kdforge.tasks.base import build_task

# ---------------------------------------------------------------------------- helpers


def softmax_rows(n: int, k: int, seed: int = 0) -> np.ndarray:
    logits = np.random.default_rng(seed).normal(size=(n, k))
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


class LengthModel:
    """A fixed predict_fn over text inputs: softmax of (len(text), -len(text) / 2, 1) scaled by 0.1,
    counting the calls (one per HTTP request when served)."""

    def __init__(self):
        self.calls = 0
        self.inputs = 0

    def __call__(self, items: list[dict]) -> np.ndarray:
        self.calls += 1
        self.inputs += len(items)
        return np.stack([self.expected(item) for item in items])

    @staticmethod
    def expected(item: dict) -> np.ndarray:
        n = len(item["text"]) + len(item.get("text_pair", ""))
        z = 0.1 * np.array([n, -n / 2, 1.0])
        return np.exp(z) / np.exp(z).sum()


@contextmanager
def served(predict_fn, num_classes: int):
    server, thread = serve(predict_fn, num_classes)
    try:
        yield server_url(server)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@contextmanager
def scripted(responses: list[tuple[int, bytes]]):
    """A raw HTTP server answering request i with ``responses[min(i, len - 1)]`` (status, body);
    yields (url, the list of request bodies received)."""
    received: list[bytes] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            received.append(self.rfile.read(int(self.headers["Content-Length"])))
            status, body = responses[min(len(received) - 1, len(responses) - 1)]
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/predict", received
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def texts(*words: str) -> list[dict]:
    return [encode_text(word) for word in words]


# ---------------------------------------------------------------------------- protocol


def test_image_round_trip_through_json():
    image = np.random.default_rng(0).integers(0, 256, size=(3, 5, 7), dtype=np.uint8)
    item = json.loads(json.dumps(encode_image(image)))
    assert item["image"]["shape"] == [3, 5, 7] and item["image"]["dtype"] == "uint8"
    decoded = decode_image(item)
    assert decoded.dtype == np.uint8 and np.array_equal(decoded, image)
    item["image"]["shape"] = [3, 5, 6]
    with pytest.raises(KDForgeError, match="105 bytes but shape"):
        decode_image(item)
    with pytest.raises(KDForgeError, match="uint8 array"):
        encode_image(image.astype(np.float32))


def test_encode_text_single_and_pair():
    assert encode_text("a") == {"text": "a"}
    assert encode_text("a", "b") == {"text": "a", "text_pair": "b"}


def test_input_key_is_canonical_and_depends_on_identity():
    item = {"text": "héllo", "text_pair": "x"}
    reordered = {"text_pair": "x", "text": "héllo"}
    by_hand = hashlib.sha256(b"http://t#1\0" + '{"text":"héllo","text_pair":"x"}'.encode()).hexdigest()
    assert input_key("http://t#1", item) == input_key("http://t#1", reordered) == by_hand
    assert input_key("http://t#2", item) != by_hand
    assert input_key("http://t#1", {"text": "hello", "text_pair": "x"}) != by_hand


def test_check_probabilities_accepts_softmax_rows():
    rows = softmax_rows(4, 3)
    out = check_probabilities(rows.tolist(), 4, 3, "src")
    assert out.dtype == np.float32 and out.shape == (4, 3) and np.allclose(out, rows, atol=1e-7)
    assert check_probabilities(torch.tensor(rows), 4, 3, "src").shape == (4, 3)


@pytest.mark.parametrize("rows, n, problem", [
    ({"probabilities": []}, 1, "not a list of lists"),
    ([0.2, 0.8], 1, "not a list of lists"),
    ([[0.2, 0.8]], 2, "1 rows of probabilities for 2 inputs"),
    ([[0.2, 0.8]], 1, "expected 3, got 2"),
    ([[0.5, "x", 0.5]], 1, "not a number"),
    ([[1.2, -0.2, 0.0]], 1, "negative or not finite"),
    ([[float("nan"), 0.5, 0.5]], 1, "negative or not finite"),
    ([[2.0, 1.0, 0.5]], 1, r"sums to 3.5.*softmax\), not logits"),
])
def test_check_probabilities_names_the_problem(rows, n, problem):
    with pytest.raises(KDForgeError, match=problem) as err:
        check_probabilities(rows, n, 3, "http://teacher:9/p")
    assert "http://teacher:9/p" in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------------------- HTTP client and server


def test_http_teacher_matches_the_served_function():
    fn = LengthModel()
    items = texts("a", "bb", "ccc", "dddd") + [encode_text("pair", "second")]
    with served(fn, 3) as url:
        teacher = HttpTeacher(url, 3, version="v1", batch_size=2)
        got = teacher.predict(items)
    assert isinstance(teacher, BlackBoxClient) and teacher.identity == f"{url}#v1"
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, np.stack([LengthModel.expected(i) for i in items]), atol=1e-6)
    assert fn.calls == 3 and fn.inputs == 5  # chunks of 2, 2, 1


def test_served_image_model_matches_calling_it():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(2 * 3 * 4, 5))

    def predict(items):
        x = torch.stack([torch.from_numpy(decode_image(i)).float() / 255 for i in items])
        return torch.softmax(net(x), -1).detach()

    images = [encode_image(np.random.default_rng(s).integers(0, 256, (2, 3, 4), dtype=np.uint8)) for s in range(3)]
    with served(predict, 5) as url:
        got = HttpTeacher(url, 5).predict(images)
    np.testing.assert_allclose(got, predict(images).numpy(), atol=1e-6)


def test_server_answers_malformed_requests_with_400():
    with served(LengthModel(), 3) as url:
        request = urllib.request.Request(url, data=b"nope", method="POST")
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(request, timeout=5)
        assert err.value.code == 400 and "not valid JSON" in json.loads(err.value.read())["error"]
        with pytest.raises(KDForgeError, match=r"refused the request: HTTP 400.*inputs\[1\]") as err:
            HttpTeacher(url, 3, retries=0).predict([encode_text("ok"), {"txt": "typo"}])
        assert url in str(err.value)


def test_retries_503_then_succeeds():
    good = json.dumps({"probabilities": [[0.25, 0.75]]}).encode()
    with scripted([(503, b"{}"), (503, b"{}"), (200, good)]) as (url, received):
        got = HttpTeacher(url, 2, retries=3, backoff_s=0.01).predict(texts("x"))
    assert len(received) == 3 and np.allclose(got, [[0.25, 0.75]])
    assert json.loads(received[0]) == {"inputs": [{"text": "x"}]}


def test_always_500_is_one_line_naming_url_and_status():
    with scripted([(500, b'{"error": "boom"}')]) as (url, received):
        with pytest.raises(KDForgeError) as err:
            HttpTeacher(url, 2, retries=2, backoff_s=0.01).predict(texts("x"))
    message = str(err.value)
    assert len(received) == 3 and "\n" not in message
    assert url in message and "HTTP 500" in message and "boom" in message and "timeout_s" in message


def test_4xx_is_not_retried():
    with scripted([(404, b"")]) as (url, received):
        with pytest.raises(KDForgeError, match="HTTP 404"):
            HttpTeacher(url, 2, retries=3, backoff_s=0.01).predict(texts("x"))
    assert len(received) == 1


def test_unreachable_url_is_one_line():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    url = f"http://127.0.0.1:{port}/predict"
    with pytest.raises(KDForgeError, match="network error") as err:
        HttpTeacher(url, 2, retries=1, backoff_s=0.01).predict(texts("x"))
    assert url in str(err.value) and "server is running" in str(err.value) and "\n" not in str(err.value)


def test_malformed_json_answer_is_one_line():
    with scripted([(200, b"{not json")]) as (url, _):
        with pytest.raises(KDForgeError, match="malformed JSON") as err:
            HttpTeacher(url, 2).predict(texts("x"))
    assert url in str(err.value) and "\n" not in str(err.value)


def test_logits_from_a_server_are_refused():
    with scripted([(200, json.dumps({"probabilities": [[2.0, -1.0]]}).encode())]) as (url, _):
        with pytest.raises(KDForgeError, match="not logits") as err:
            HttpTeacher(url, 2).predict(texts("x"))
    assert url in str(err.value)


def test_only_http_urls():
    with pytest.raises(KDForgeError, match="not an http"):
        HttpTeacher("file:///etc/passwd", 2)


def test_rate_limit_spaces_requests():
    fn = LengthModel()
    with served(fn, 3) as url:
        teacher = HttpTeacher(url, 3, batch_size=1, rate_limit_per_s=20)
        start = time.monotonic()
        teacher.predict(texts("a", "b", "c", "d", "e"))
        elapsed = time.monotonic() - start
    assert fn.calls == 5 and elapsed >= 0.2  # 4 gaps of 1/20 s


# ---------------------------------------------------------------------------- callable and file teachers


def test_callable_teacher_checks_its_answers():
    teacher = CallableTeacher(LengthModel(), "length", 3, version="2")
    assert teacher.identity == "callable:length#2"
    np.testing.assert_allclose(teacher.predict(texts("ab")), [LengthModel.expected({"text": "ab"})], atol=1e-6)
    logits = CallableTeacher(lambda items: np.ones((len(items), 3)), "raw", 3)
    with pytest.raises(KDForgeError, match="callable:raw#.*not logits"):
        logits.predict(texts("a"))


def test_file_teacher_looks_inputs_up(tmp_path):
    rows = softmax_rows(2, 3)
    path = tmp_path / "preds.jsonl"
    lines = [{"input": {"text_pair": "q", "text": "p"}, "probabilities": rows[0].tolist()},
             {"input": {"text": "alone"}, "probabilities": rows[1].tolist()}]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    teacher = FileTeacher(path, 3)
    assert teacher.identity == "file:" + hashlib.sha256(path.read_bytes()).hexdigest()
    got = teacher.predict([encode_text("alone"), encode_text("p", "q")])
    np.testing.assert_allclose(got, rows[::-1], atol=1e-7)
    with pytest.raises(KDForgeError, match="not in .*preds.jsonl; add its prediction"):
        teacher.predict(texts("missing"))
    path.write_text(json.dumps({"input": {"text": "a"}, "probabilities": [0.5, 0.5]}) + "\n")
    with pytest.raises(KDForgeError, match="line 1 of .*expected 3, got 2"):
        FileTeacher(path, 3)


# ---------------------------------------------------------------------------- cache and budget


def test_cache_answers_repeats_without_requests(tmp_path):
    fn = LengthModel()
    items = texts("a", "bb", "a", "ccc")  # "a" twice: sent once
    with served(fn, 3) as url:
        client = HttpTeacher(url, 3)
        teacher = BudgetedTeacher(client, QueryCache(tmp_path / "cache", client.identity), None)
        first = teacher.predict(items)
        assert fn.calls == 1 and fn.inputs == 3
        second = teacher.predict(items)
    assert fn.calls == 1  # the second call made no request
    np.testing.assert_array_equal(first, second)
    np.testing.assert_allclose(first, np.stack([LengthModel.expected(i) for i in items]), atol=1e-6)
    assert teacher.stats() == {"queries_total": 3, "queries_this_run": 3, "cache_hits": 4}
    assert (tmp_path / "cache" / "answers.sqlite").is_file()


def test_budget_refuses_before_sending_and_holds_across_resumed_runs(tmp_path):
    fn = LengthModel()
    folder = tmp_path / "cache"
    with served(fn, 3) as url:
        client = HttpTeacher(url, 3, batch_size=2)
        teacher = BudgetedTeacher(client, QueryCache(folder, client.identity), max_queries=5)
        teacher.predict(texts("a", "b", "c"))  # 2 requests (chunks of 2), 3 queries
        assert (fn.calls, teacher.queries) == (2, 3)
        with pytest.raises(KDForgeError, match="max_queries 5 would be exceeded: 3 new inputs needed, 3 used") as err:
            teacher.predict(texts("a", "d", "e", "f"))
        assert "raise black_box.max_queries" in str(err.value)
        assert fn.calls == 2  # nothing of the refused call was sent
        teacher.predict(texts("b", "a"))  # earlier answers stay
        assert fn.calls == 2 and teacher.cache_hits == 2
        teacher.predict(texts("d", "e"))  # exactly at the budget
        assert teacher.stats()["queries_total"] == 5

        resumed = BudgetedTeacher(client, QueryCache(folder, client.identity), max_queries=5)
        calls = fn.calls
        again = resumed.predict(texts("a", "b", "c", "d", "e"))
        assert fn.calls == calls  # a resumed run does not pay twice
        assert resumed.stats() == {"queries_total": 5, "queries_this_run": 0, "cache_hits": 5}
        np.testing.assert_allclose(again, np.stack([LengthModel.expected(i) for i in texts(*"abcde")]), atol=1e-6)
        with pytest.raises(KDForgeError, match="1 new inputs needed, 5 used"):
            resumed.predict(texts("z"))  # the usage total persisted
        assert fn.calls == calls


def test_cache_is_per_identity(tmp_path):
    first = CallableTeacher(LengthModel(), "m", 3, version="1")
    second_fn = LengthModel()
    second = CallableTeacher(second_fn, "m", 3, version="2")
    BudgetedTeacher(first, QueryCache(tmp_path, first.identity), None).predict(texts("a"))
    BudgetedTeacher(second, QueryCache(tmp_path, second.identity), None).predict(texts("a"))
    assert second_fn.calls == 1  # another version is another teacher
    with pytest.raises(KDForgeError, match="open the cache with the client's identity"):
        BudgetedTeacher(second, QueryCache(tmp_path, first.identity), None)


def test_cache_folder_that_is_a_file(tmp_path):
    path = tmp_path / "cache"
    path.write_text("x")
    with pytest.raises(KDForgeError, match="cache folder .*cache is a file; delete it or set black_box.cache_dir"):
        QueryCache(path, "t")


# ---------------------------------------------------------------------------- serving kdforge models


@pytest.fixture
def csv_task(sentiment_dir):
    return build_task(TaskConfig(name="csv", train_file=str(sentiment_dir / "train.csv"),
                                 dev_file=str(sentiment_dir / "dev.csv"), max_length=16))


def reference_probs(loaded: LoadedModel, items: list[dict], max_length: int) -> np.ndarray:
    loaded.model.eval()
    rows = []
    for item in items:  # one at a time: no padding involved
        encoded = loaded.tokenizer(item["text"], item.get("text_pair"), truncation=True, max_length=max_length,
                                   return_tensors="pt")
        with torch.no_grad():
            rows.append(torch.softmax(loaded.model(**encoded).logits, -1)[0].numpy())
    return np.stack(rows)


def test_served_tiny_bert_gives_softmax_of_its_logits(tiny_teacher_dir, csv_task, one_thread):
    loaded = load_model(str(tiny_teacher_dir), csv_task)
    items = [encode_text("the movie was great"), encode_text("dull"), encode_text("a pair", "of sentences"),
             encode_text(" ".join(["word"] * 40))]  # truncated at max_length 16
    with served(model_predictor(loaded, csv_task), csv_task.num_labels) as url:
        got = HttpTeacher(url, 2).predict(items)
    np.testing.assert_allclose(got, reference_probs(loaded, items, 16), atol=1e-5)
    assert not np.allclose(got, got[0])  # different inputs, different answers


def test_run_predictor_serves_a_finished_runs_student(tmp_path, job_tree, tiny_teacher_dir, csv_task, one_thread):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_teacher_dir, run_dir / "student")
    (run_dir / "config.yaml").write_text(yaml.safe_dump({**job_tree, "output_dir": str(run_dir)}))
    predict_fn, num_classes = run_predictor(run_dir)
    items = texts("great film", "awful plot")
    assert num_classes == 2
    expected = reference_probs(load_model(str(tiny_teacher_dir), csv_task), items, 16)
    np.testing.assert_allclose(predict_fn(items), expected, atol=1e-5)
    with pytest.raises(KDForgeError, match="no role 'nobody'; serve one of student, teacher"):
        run_predictor(run_dir, role="nobody")


def test_image_predictor_normalises_like_the_task():
    task = build_task(TaskConfig(name="digits"))
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    predict = model_predictor(LoadedModel(net), task)
    images = np.random.default_rng(1).integers(0, 256, (3, 1, 8, 8), dtype=np.uint8)
    got = predict([encode_image(image) for image in images])
    x = (torch.from_numpy(images).float() / 255 - 0.5) / 0.5  # digits: mean = std = 0.5
    np.testing.assert_allclose(got, torch.softmax(net(x), -1).detach().numpy(), atol=1e-6)
    with pytest.raises(KDForgeError, match="takes 1; send shape"):
        predict([encode_image(np.zeros((3, 8, 8), dtype=np.uint8))])
    with pytest.raises(KDForgeError, match="takes image inputs"):
        predict(texts("a"))
