"""Serve a model as a black-box teacher over HTTP, speaking :mod:`kdforge.blackbox.protocol`.

``POST /`` (any path) with ``{"inputs": [...]}`` answers ``{"probabilities": [[...], ...]}``; a
malformed request gets HTTP 400 and ``{"error": "<one line>"}``, a failure of the model HTTP 500.
``GET /`` answers ``{"protocol": "kdforge-blackbox/1", "num_classes": K}`` (a health check).

:func:`model_predictor` turns protocol inputs into a kdforge model's probabilities, preprocessing as
the task does for evaluation: text through the model's tokenizer (``truncation``, ``task.max_length``,
padding), images from raw ``uint8`` pixels through ``(x / 255 - mean) / std`` with the task's
mean and std (:func:`kdforge.tasks.vision.normalize`); then ``softmax(logits)``.
:func:`serve_run` serves one model of a finished run (``kdforge serve``).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdforge.blackbox.protocol import check_input, check_probabilities, decode_image
from kdforge.errors import KDForgeError

log = logging.getLogger("kdforge")

PROTOCOL = "kdforge-blackbox/1"
MAX_BODY_BYTES = 256 * 2**20

PredictFn = Callable[[list[dict]], Any]


# ---------------------------------------------------------------------------- the HTTP server


def _handler(predict_fn: PredictFn, num_classes: int) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _send(self, status: int, payload: dict) -> None:
            body = json.dumps(payload, separators=(",", ":")).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            self._send(200, {"protocol": PROTOCOL, "num_classes": num_classes})

        def do_POST(self) -> None:  # noqa: N802
            try:
                inputs = self._read_inputs()
            except KDForgeError as err:
                self.close_connection = True  # an unread body must not be parsed as the next request
                self._send(400, {"error": str(err)})
                return
            try:
                rows = check_probabilities(predict_fn(inputs), len(inputs), num_classes, "the served model")
            except KDForgeError as err:  # inputs the model cannot take (an image for a text model, ...)
                self._send(400, {"error": str(err)})
                return
            except Exception as err:  # noqa: BLE001 (the client gets a 500 and the server keeps serving)
                log.exception("the served model failed on a request")
                self._send(500, {"error": f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"})
                return
            self._send(200, {"probabilities": rows.tolist()})

        def _read_inputs(self) -> list[dict]:
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                raise KDForgeError("the request has no valid Content-Length; send a JSON body") from None
            if not 0 <= length <= MAX_BODY_BYTES:
                raise KDForgeError(f"the request body has {length} bytes (at most {MAX_BODY_BYTES}); "
                                   "send fewer inputs per request")
            try:
                body = json.loads(self.rfile.read(length))
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise KDForgeError(f"the request body is not valid JSON ({err}); "
                                   'send {"inputs": [...]}') from None
            if not isinstance(body, dict) or not isinstance(body.get("inputs"), list):
                raise KDForgeError('the request body must be a JSON object {"inputs": [...]}')
            for i, item in enumerate(body["inputs"]):
                try:
                    check_input(item)
                except KDForgeError as err:
                    raise KDForgeError(f"inputs[{i}]: {err}") from None
            return body["inputs"]

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's signature)
            log.debug("serve: %s - %s", self.address_string(), format % args)

    return Handler


def check_port(port: int) -> None:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise KDForgeError(f"--port {port}: a TCP port is 0 to 65535 (0: any free one)")


def make_server(predict_fn: PredictFn, num_classes: int, host: str = "127.0.0.1",
                port: int = 0) -> ThreadingHTTPServer:
    """An HTTP server (not yet serving) answering the protocol with ``predict_fn``; port 0 picks a free port."""
    check_port(port)
    try:
        server = ThreadingHTTPServer((host, port), _handler(predict_fn, num_classes))
    except OSError as err:
        raise KDForgeError(f"cannot listen on {host}:{port} ({err.strerror or err}); pick another --port or "
                           "--host") from None
    server.daemon_threads = True
    return server


def server_url(server: ThreadingHTTPServer) -> str:
    host, port = server.server_address[:2]
    return f"http://{host}:{port}/"


def serve(predict_fn: PredictFn, num_classes: int, host: str = "127.0.0.1",
          port: int = 0) -> tuple[ThreadingHTTPServer, threading.Thread]:
    """Serve ``predict_fn`` (``list[dict] -> probabilities``) in a daemon thread; stop with
    ``server.shutdown(); server.server_close()``. The URL is :func:`server_url` of the server."""
    server = make_server(predict_fn, num_classes, host, port)
    thread = threading.Thread(target=server.serve_forever, name="kdforge-serve", daemon=True)
    thread.start()
    return server, thread


# ---------------------------------------------------------------------------- models


def _softmax(logits: torch.Tensor) -> np.ndarray:
    return torch.softmax(logits.float(), dim=-1).cpu().numpy()


def model_predictor(loaded_model: Any, task: Any, batch_size: int = 64) -> Callable[[list[dict]], np.ndarray]:
    """``predict_fn(items) -> float32 (N, K)``: a classification model (a
    :class:`~kdforge.models.loading.LoadedModel`) applied to protocol inputs, preprocessed as ``task``
    (a kdforge Task) does; at most ``batch_size`` inputs per forward pass, one request at a time."""
    from kdforge.models.adapter import ModelAdapter

    if not task.problem.classes:
        raise KDForgeError(f"task {task.name} is a {task.problem_type} task; only classification models "
                           "can be served as black-box teachers (they answer class probabilities)")
    model = loaded_model.model
    model.eval()
    adapter = ModelAdapter(model)
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    lock = threading.Lock()  # a fast tokenizer is not thread-safe; one forward pass at a time anyway
    if task.modality == "text":
        if loaded_model.tokenizer is None:
            raise KDForgeError(f"the model of text task {task.name} has no tokenizer; serve a model folder "
                               "saved with its tokenizer")
        encode = _TextEncoder(loaded_model.tokenizer, getattr(task.config, "max_length", None) or 128, task.name)
    else:
        encode = _ImageEncoder(task)

    def predict(items: list[dict]) -> np.ndarray:
        probs = np.zeros((len(items), task.num_labels), dtype=np.float32)
        groups: dict[Any, list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(encode.group(item), []).append(i)
        with lock, torch.inference_mode():
            for indices in groups.values():
                for start in range(0, len(indices), batch_size):
                    part = indices[start:start + batch_size]
                    batch = encode([items[i] for i in part])
                    logits = adapter({k: v.to(device) for k, v in batch.items()}).logits
                    probs[part] = _softmax(logits)
        return probs

    return predict


class _TextEncoder:
    """Protocol text inputs -> tokenizer outputs; single sentences and pairs go in separate batches."""

    def __init__(self, tokenizer: Any, max_length: int, task_name: str):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.task_name = task_name

    def group(self, item: dict) -> bool:
        if not isinstance(item.get("text"), str):
            raise KDForgeError(f"task {self.task_name} takes text inputs; send {{\"text\": ...}}, not "
                               f"{sorted(item)}")
        return "text_pair" in item

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        text_a = [item["text"] for item in items]
        text_b = [item["text_pair"] for item in items] if "text_pair" in items[0] else None
        encoded = self.tokenizer(text_a, text_b, truncation=True, max_length=self.max_length, padding=True,
                                 return_tensors="pt")
        return dict(encoded.items())


class _ImageEncoder:
    """Protocol image inputs -> normalised ``pixel_values``; images of one shape go in one batch."""

    def __init__(self, task: Any):
        self.task = task
        self.in_channels = getattr(task, "in_channels", 3)
        self.mean = tuple(getattr(task, "mean", (0.5,) * self.in_channels))
        self.std = tuple(getattr(task, "std", (0.5,) * self.in_channels))

    def group(self, item: dict) -> tuple[int, ...]:
        if "image" not in item:
            raise KDForgeError(f"task {self.task.name} takes image inputs; send {{\"image\": {{...}}}}, not "
                               f"{sorted(item)}")
        shape = tuple(item["image"]["shape"])
        if shape[0] != self.in_channels:
            raise KDForgeError(f"an image has {shape[0]} channels but task {self.task.name} takes "
                               f"{self.in_channels}; send shape [{self.in_channels}, H, W]")
        return shape

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        from kdforge.tasks.vision import normalize

        images = torch.stack([torch.from_numpy(decode_image(item)).permute(1, 2, 0) for item in items])
        return {"pixel_values": normalize(images, self.mean, self.std)}


# ---------------------------------------------------------------------------- finished runs


def run_predictor(run_dir: str | Path, role: str = "student") -> tuple[Callable[[list[dict]], np.ndarray], int]:
    """``(predict_fn, num_classes)`` of the model ``role`` of the finished run in ``run_dir`` (a run
    folder or its config file), loaded by :func:`kdforge.roles.loading.load_run_model`."""
    from kdforge.roles.base import capabilities
    from kdforge.roles.loading import load_run_model, run_roles
    from kdforge.run_folder import RunFolder
    from kdforge.tasks.base import build_task

    config, run = RunFolder.open_finished(run_dir)
    if role not in run_roles(config):
        raise KDForgeError(f"run {run.root} has no role {role!r}; serve one of {', '.join(run_roles(config))}")
    if not capabilities(config, role).weights:
        raise KDForgeError(f"the {role} of run {run.root} is a black box "
                           f"({config.teacher_configs()[role].black_box.describe()}): it is served already; serve "
                           "the student or another role")
    task = build_task(config.task)
    return model_predictor(load_run_model(config, run, task, role), task), task.num_labels


def serve_run(run_dir: str | Path, role: str = "student", host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve the model ``role`` of a finished run until interrupted (Ctrl+C)."""
    check_port(port)  # before the model is loaded
    predict_fn, num_classes = run_predictor(run_dir, role)
    server = make_server(predict_fn, num_classes, host, port)
    log.info("serving the %s of %s (%d classes) at %s; Ctrl+C stops", role, run_dir, num_classes,
             server_url(server))
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        log.info("stopped serving %s", server_url(server))
    finally:
        server.server_close()
