"""Measure models on a task: official metrics, ECE, per-class scores, parameters, size on disk, latency.

A :class:`Form` is one deployable form of a model (the PyTorch model, its ONNX export, the int8 ONNX
export): how to score it (an adapter: batch -> Outputs) and how to time it (``forward(batch_size)``
on a fixed input). :func:`evaluate_forms` scores every form on the same split and then times them all
*interleaved* in one process (:func:`kdforge.evaluation.latency.interleaved_latency`), so a load
change during the measurement hits every form alike and the speedups stay honest.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdforge.config import EvalConfig
from kdforge.engine.predict import predict
from kdforge.evaluation.latency import image_inputs, interleaved_latency, text_inputs
from kdforge.evaluation.model_report import ModelReport
from kdforge.evaluation.sanity import per_class_report
from kdforge.evaluation.similarity import similarity_information
from kdforge.evaluation.size import count_parameters, dir_size_mb, size_on_disk_mb
from kdforge.models.adapter import ModelAdapter
from kdforge.models.loading import LoadedModel
from kdforge.models.outputs import Outputs


@dataclass
class Form:
    """One deployable form of a model. ``adapter(batch) -> Outputs`` scores it; ``forward(batch_size)``
    runs it once on a fixed input of that batch size (for timing); ``tokenizer`` collates its inputs."""

    name: str
    adapter: nn.Module
    forward: Callable[[int], Any] | None  # None: scored, not timed
    tokenizer: Any
    params: int
    size_mb: float
    inputs: dict[str, Any] | None = None  # what it is timed on: {"seq_len": n} or {"image_shape": [c, h, w]}


def input_maker(loaded: LoadedModel, task, config: EvalConfig) -> tuple[Callable[[int], Any], dict[str, Any]]:
    """``make(batch_size)``: a fixed latency input for ``loaded`` (text: :meth:`EvalConfig.timed_seq_len`
    tokens; images: the task's image size), and what it is: ``{"seq_len": n}`` or ``{"image_shape": [c, h, w]}``."""
    if loaded.tokenizer is not None:
        embeddings = loaded.model.get_input_embeddings() if hasattr(loaded.model, "get_input_embeddings") else None
        rows = getattr(embeddings, "num_embeddings", None)
        seq_len = config.timed_seq_len(task.config)
        return lambda bs: text_inputs(loaded.tokenizer, bs, seq_len, vocab_limit=rows), {"seq_len": seq_len}
    collate = task.collator(None, train=False)
    shape = tuple(collate([task.split(task.eval_split)[0]])["pixel_values"].shape[1:])
    return lambda bs: image_inputs(bs, shape), {"image_shape": [int(n) for n in shape]}


def pytorch_form(name: str, loaded: LoadedModel, task, config: EvalConfig) -> Form:
    model = loaded.model.to("cpu").eval()
    make, inputs = input_maker(loaded, task, config)
    prepared: dict[int, Any] = {}

    def forward(batch_size: int) -> Any:
        inputs = prepared.setdefault(batch_size, make(batch_size))
        return model(**inputs) if isinstance(inputs, dict) else model(inputs)

    return Form(name, ModelAdapter(model), forward, loaded.tokenizer, count_parameters(model),
                size_on_disk_mb(model), inputs)


class EnsembleAdapter(nn.Module):
    """Members' adapters -> ``Outputs(logits = log mean_k softmax(z_k))``: the ensemble's class
    probabilities as logits (their softmax is the mean exactly; born-again's BANE averages them so)."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, batch: dict[str, Any]) -> Outputs:
        log_p = torch.stack([torch.log_softmax(m(batch).logits.float(), dim=-1) for m in self.members])
        return Outputs(logits=torch.logsumexp(log_p, dim=0) - torch.log(torch.tensor(float(len(self.members)))))


def ensemble_form(name: str, members: list[LoadedModel]) -> Form:
    """The ensemble of ``members`` (sharing the first one's tokenizer), scored but not timed; its parameters
    and size are the members' together."""
    models = [m.model.to("cpu").eval() for m in members]
    return Form(name, EnsembleAdapter([ModelAdapter(m) for m in models]), None, members[0].tokenizer,
                sum(count_parameters(m) for m in models), sum(size_on_disk_mb(m) for m in models))


def onnx_form(name: str, path: Path, loaded: LoadedModel, task, config: EvalConfig) -> Form:
    """The ONNX file ``path`` exported from ``loaded`` (its tokenizer and parameter count), run by
    onnxruntime with the same threads as the PyTorch forms."""
    from kdforge.deploy.onnx_runtime import OnnxAdapter, make_session, onnx_forward

    session = make_session(path, config.threads or torch.get_num_threads())
    make, inputs = input_maker(loaded, task, config)
    return Form(name, OnnxAdapter(session), onnx_forward(session, make), loaded.tokenizer,
                count_parameters(loaded.model), dir_size_mb(path), inputs)


def score_form(form: Form, task, data, config: EvalConfig) -> ModelReport:
    """Score, ECE, reliability bins and (classification) per-class scores and the similarity information of
    its responses (:mod:`kdforge.evaluation.similarity`) of one form; no latency yet."""
    collate = task.collator(form.tokenizer, train=False)
    per_class = similarity = None
    if task.problem.streamed:
        scores = task.evaluate(form.adapter, data, collate, config.batch_size, "cpu", config.ece_bins,
                               f"eval {form.name}")
    else:
        logits, labels = predict(form.adapter, data, collate, config.batch_size, "cpu", f"eval {form.name}")
        scores = task.scores(logits, labels, config.ece_bins)
        if task.problem.classes:
            per_class = per_class_report(logits, labels, list(task.label_names))
            similarity = similarity_information(logits, labels)
    return ModelReport(name=form.name, metrics=scores.metrics, main_metric=task.main_metric, ece=scores.ece,
                       params=form.params, size_mb=form.size_mb, latency={}, reliability=scores.reliability,
                       per_class=per_class, similarity=similarity)


def time_forms(forms: list[Form], config: EvalConfig) -> dict[str, Any]:
    """Every form timed interleaved (:func:`interleaved_latency`) with the config's batch sizes, warm-up,
    rounds and threads; the first form is the speedups' reference. Each model's entry also says what it
    was timed on (``inputs``, see :class:`Form`) and that it was measured ``interleaved``."""
    timing = interleaved_latency({f.name: f.forward for f in forms}, config.latency_batch_sizes,
                                 config.latency_warmup, config.latency_repeats, config.threads,
                                 max_spread=config.latency_max_spread)
    for form in forms:
        timing["models"][form.name].update(interleaved=True, **({"inputs": form.inputs} if form.inputs else {}))
    return timing


def evaluate_forms(forms: list[Form], task, data, config: EvalConfig) -> tuple[dict[str, ModelReport], dict]:
    """Each form's :class:`ModelReport` on ``data`` (its latency from one interleaved measurement of all
    the forms, the first form being the reference of the speedups), and that measurement."""
    reports = {f.name: score_form(f, task, data, config) for f in forms}
    timing = time_forms(forms, config)
    for name, report in reports.items():
        report.latency = dict(timing["models"][name])
    return reports, timing
