"""A black-box teacher as an ordinary kdforge teacher model: :class:`BlackBoxModule`.

The module wraps a :class:`~kdforge.blackbox.query_cache.BudgetedTeacher` (answers cached, budget
enforced) and turns a kdforge batch into protocol inputs (:mod:`kdforge.blackbox.protocol`):

* images: the normalised ``pixel_values`` ``x = (u / 255 - mean) / std`` are turned back into the raw
  pixels ``u = clamp(round((x * std + mean) * 255), 0, 255)`` as ``uint8 (C, H, W)`` (exact: the
  rounding error of the float round trip is far below 1/2), so the teacher sees the image the task
  read, and the same image always has the same cache key;
* text: the raw sentences the text collator puts in the batch under ``texts`` (``(text_a, text_b)``
  per example; the teacher tokenizes as it was trained to).

Its logits are ``log(max(p, PROB_FLOOR))`` of the returned probabilities ``p``, so
``softmax(logits) = p`` (up to the floor) and every logit objective (``hinton_kd``, ``dkd``...) reads
the black box as it reads a model. :class:`~kdforge.models.adapter.ModelAdapter` hands the whole batch
to it (``reads_batch = True``). It has no parameters; a buffer holds the SHA-256 of the teacher's
identity, so kdforge's teacher-output cache tells black boxes (and their versions) apart.

Every request that reaches the teacher is timed (:class:`TimedClient`): the run reports the queries it
made and their round trip (:meth:`BlackBoxModule.stats`) instead of a latency measured by repeated
calls, which would spend the query budget.
"""

from __future__ import annotations

import hashlib
import importlib
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kdforge.blackbox.clients import BlackBoxClient, CallableTeacher, FileTeacher, HttpTeacher
from kdforge.blackbox.protocol import encode_image, encode_text
from kdforge.blackbox.query_cache import BudgetedTeacher, QueryCache
from kdforge.config import BlackBoxConfig
from kdforge.errors import KDForgeError
from kdforge.models.loading import LoadedModel
from kdforge.paths import cache_dir

#: probabilities are floored here before the log (log 0 = -inf would poison every loss)
PROB_FLOOR = 1e-12
#: the batch key holding the raw sentences of a text batch (see kdforge.tasks.text_base.TextCollator)
TEXTS_KEY = "texts"

BlackBoxes = Mapping[str, Callable[[list[dict]], Any]]
"""Black-box functions registered by name through the API (``kdforge.distill(..., black_boxes=...)``)."""


class TimedClient:
    """A black-box client whose every ``predict`` call (one request of at most ``batch_size`` inputs,
    as :class:`BudgetedTeacher` chunks them) is timed: ``requests`` holds ``(inputs, milliseconds)``."""

    def __init__(self, client: BlackBoxClient):
        self.client = client
        self.identity = client.identity
        self.num_classes = client.num_classes
        self.batch_size = getattr(client, "batch_size", 64)
        self.requests: list[tuple[int, float]] = []

    def predict(self, items: list[dict]) -> np.ndarray:
        start = time.perf_counter()
        answer = self.client.predict(items)
        self.requests.append((len(items), (time.perf_counter() - start) * 1e3))
        return answer


def pixels_to_uint8(pixel_values: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """Normalised ``(N, C, H, W)`` pixels back to ``uint8 (N, C, H, W)``: ``round((x * std + mean) * 255)``
    clamped to 0..255 (the exact inverse of :func:`kdforge.tasks.vision.normalize` on uint8 images)."""
    x = pixel_values.detach().to("cpu", torch.float64)
    mean_t = torch.tensor(mean, dtype=torch.float64).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float64).view(1, -1, 1, 1)
    return torch.round((x * std_t + mean_t) * 255).clamp_(0, 255).to(torch.uint8).numpy()


class BlackBoxModule(nn.Module):
    """A black-box teacher as a frozen model: ``forward(batch) -> logits = log(probabilities)``."""

    reads_batch = True  # ModelAdapter passes the whole batch (raw sentences included)

    def __init__(self, teacher: BudgetedTeacher, modality: str, mean: tuple[float, ...] = (),
                 std: tuple[float, ...] = (), source: str = ""):
        super().__init__()
        self.teacher = teacher
        self.modality = modality
        self.mean, self.std = tuple(mean), tuple(std)
        self.source = source or teacher.identity
        digest = hashlib.sha256(teacher.identity.encode("utf-8")).digest()
        self.register_buffer("identity_digest", torch.tensor(list(digest), dtype=torch.uint8))

    def items(self, batch: dict[str, Any]) -> list[dict]:
        """The protocol inputs of a batch's examples, in order."""
        if self.modality == "image":
            if "pixel_values" not in batch:
                raise KDForgeError(f"the black-box teacher {self.source} needs `pixel_values` in the batch (keys: "
                                   f"{sorted(batch)}); use the task's own collator")
            return [encode_image(image) for image in pixels_to_uint8(batch["pixel_values"], self.mean, self.std)]
        texts = batch.get(TEXTS_KEY)
        if texts is None:
            raise KDForgeError(f"the black-box teacher {self.source} needs the raw sentences of the batch (key "
                               f"{TEXTS_KEY!r}, keys: {sorted(batch)}); use the task's own collator")
        return [encode_text(text_a, text_b) for text_a, text_b in texts]

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        probs = torch.from_numpy(self.teacher.predict(self.items(batch)))
        return probs.clamp_min(PROB_FLOOR).log().to(self.identity_digest.device)

    def stats(self) -> dict[str, Any]:
        """The queries of this teacher: ``queries_total`` (ever, through its cache), ``queries_this_run``,
        ``cache_hits`` (this process), ``max_queries``, and the requests this process sent with their
        median round trip in ms (None when none was sent)."""
        client = self.teacher.client
        requests = client.requests if isinstance(client, TimedClient) else []
        times = [ms for _, ms in requests]
        return {"source": self.source, **self.teacher.stats(), "max_queries": self.teacher.max_queries,
                "requests": len(requests), "round_trip_ms_median": float(np.median(times)) if times else None,
                "inputs_per_request": float(np.mean([n for n, _ in requests])) if requests else None}


def stats_line(role: str, stats: Mapping[str, Any]) -> str:
    """One line for the report, e.g. ``black-box teacher `teacher` (url http://...): 320 queries this run,
    320 in total (max_queries 1000), 64 answered from the cache; 5 requests, median round trip 3.1 ms``."""
    budget = f" (max_queries {stats['max_queries']})" if stats.get("max_queries") is not None else ""
    line = (f"black-box teacher `{role}` ({stats.get('source')}): {stats['queries_this_run']} queries this run, "
            f"{stats['queries_total']} in total{budget}, {stats['cache_hits']} answered from the cache")
    if stats.get("round_trip_ms_median") is not None:
        line += (f"; {stats['requests']} requests of {stats['inputs_per_request']:.0f} inputs on average, median "
                 f"round trip {stats['round_trip_ms_median']:.1f} ms")
    return line


# ---------------------------------------------------------------------------- building one from the config


def resolve_callable(spec: str, black_boxes: BlackBoxes | None, key: str) -> Callable[[list[dict]], Any]:
    """A function registered under ``spec`` through the API, else ``package.module:function`` imported."""
    if black_boxes and spec in black_boxes:
        return black_boxes[spec]
    fix = (f"set {key}.callable to package.module:function, or pass the function by name: "
           f"kdforge.distill(config, black_boxes={{{spec!r}: fn}})")
    if ":" not in spec:
        registered = ", ".join(black_boxes or {}) or "none registered"
        raise KDForgeError(f"{key}.callable {spec!r} is not a registered black box ({registered}); {fix}")
    module_name, _, name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise KDForgeError(f"{key}.callable {spec!r}: cannot import {module_name} ({err}); {fix}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise KDForgeError(f"{key}.callable {spec!r}: {module_name} has no function {name!r}; {fix}")
    return fn


def black_box_classes(spec: BlackBoxConfig, task: Any, key: str) -> int:
    """The teacher's class count: the task's; ``num_classes`` when given must agree with it."""
    if not task.problem.classes:
        raise KDForgeError(f"{key}: a black-box teacher answers class probabilities, but task {task.name} is "
                           f"{task.problem_type}; use a classification task or a teacher `model`")
    if spec.num_classes is not None and spec.num_classes != task.num_labels:
        raise KDForgeError(f"{key}.num_classes is {spec.num_classes} but task {task.name} has {task.num_labels} "
                           f"labels; the teacher must answer the task's classes (fix {key}.num_classes)")
    return task.num_labels


def make_client(spec: BlackBoxConfig, num_classes: int, black_boxes: BlackBoxes | None, key: str) -> BlackBoxClient:
    """The HTTP, file or callable client ``spec`` names."""
    if spec.url is not None:
        return HttpTeacher(spec.url, num_classes, spec.version, spec.timeout_s, spec.retries,
                           rate_limit_per_s=spec.rate_limit_per_s, batch_size=spec.batch_size)
    if spec.file is not None:
        return FileTeacher(spec.file, num_classes)
    return CallableTeacher(resolve_callable(spec.callable, black_boxes, key), spec.callable, num_classes,
                           spec.version)


def cache_folder(spec: BlackBoxConfig) -> Path:
    """``black_box.cache_dir``, else ``$KDFORGE_CACHE/black-box``."""
    return Path(spec.cache_dir).expanduser() if spec.cache_dir else cache_dir() / "black-box"


def black_box_teacher(spec: BlackBoxConfig, task: Any, key: str = "teacher.black_box",
                      black_boxes: BlackBoxes | None = None, tokenizer: Any = None) -> LoadedModel:
    """The black-box teacher ``spec`` as a LoadedModel: its :class:`BlackBoxModule` and, for text tasks,
    ``tokenizer`` (the student's: the teacher's own is unknown; collators need one)."""
    num_classes = black_box_classes(spec, task, key)
    client = TimedClient(make_client(spec, num_classes, black_boxes, key))
    budgeted = BudgetedTeacher(client, QueryCache(cache_folder(spec), client.identity), spec.max_queries,
                               chunk_size=spec.batch_size)
    source = f"black box {spec.describe()}"
    module = BlackBoxModule(budgeted, task.modality, getattr(task, "mean", ()), getattr(task, "std", ()), source)
    return LoadedModel(module.eval(), tokenizer if task.modality == "text" else None, source)
