"""A Hugging Face model card (``README.md``) for an exported student.

The card is built with ``huggingface_hub``'s :class:`ModelCard` / :class:`ModelCardData`: a YAML
metadata block (``model-index`` eval results, ``pipeline_tag``, ``library_name``, tags, datasets,
metrics, ``base_model``) and a Markdown body written here (no Jinja template, nothing fetched from
the Hub): the student's scores beside the teacher's with retention = 100 * student / teacher (the
formula of kdforge's report and ``kdforge compare``); its speed (what it was timed on, the CPU and
threads, the speedup over the teacher with its 95% interval and the latency-noise warning, all worked out
by the evaluation: :class:`Deployment`); its deployment forms (ONNX fp32, int8) with
an onnxruntime snippet; how it was distilled and how to load it. The file is written atomically.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdforge.io import atomic_write_text

#: kdforge task name -> (Hub dataset id, pretty name, dataset config, split kdforge evaluates on)
_HUB_DATASETS: dict[str, tuple[str, str, str | None, str]] = {
    **{f"glue/{name}": ("nyu-mll/glue", f"GLUE {name.upper()}", name, "validation")
       for name in ("sst2", "mrpc", "rte", "cola", "stsb", "qnli", "qqp", "mnli", "wnli")},
    "cifar10": ("uoft-cs/cifar10", "CIFAR-10", None, "test"),
}

_PATH_PLACEHOLDER = "path/to/this/folder"  # in the loading snippets: the folder, or its Hub repo id
_EXPORTS_PLACEHOLDER = "path/to/exports"  # in the ONNX snippet: the run's exports/ folder
_VISION_META = "kdforge_model.json"  # written beside a built-in vision net's weights (kdforge.deploy.export)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_hub_id(spec: str | None) -> bool:
    """``owner/name`` or ``name`` that is not a local path nor a kdforge spec (``package:``, ``vision:``)."""
    if not spec or ":" in spec or spec.startswith((".", "/", "~")) or Path(spec).exists():
        return False
    return re.fullmatch(r"[\w.-]+(/[\w.-]+)?", spec) is not None


def _fmt(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if _number(value) else "n/a"


@dataclass
class Deployment:
    """What the card says about the student's speed and its deployment forms (every field optional), worked
    out by the evaluation (:func:`kdforge.evaluation.run_report.student_deployment`; this module only lays it out).

    forms:       the student's forms by name (``"student"``, ``"student onnx fp32"``, ``"student onnx int8"``) as
                 ``metrics.json`` reports (metrics, size_mb, latency).
    speedups:    per form and batch size, its speedup over the reference with the 95% interval, e.g.
                 ``{"student": {"1": "2.50x [2.31-2.70]"}}``; reference: what the speedups are over.
    noise:       the latency-noise line of the measurement (None when it was not noisy).
    files:       each ONNX form's file by form name, in the run folder's ``exports/``.
    timed_on:    what was timed, e.g. ``"sequence length 64 tokens, batch sizes 1 and 32"``.
    hardware:    where, e.g. ``"Intel Xeon ... (2 logical CPUs), 1 torch thread"``.
    max_length:  text: the tokenizer's truncation length (``task.max_length``) in the ONNX snippet.
    image_shape: vision: one image's (C, H, W), the ONNX input being (N, C, H, W).
    """

    forms: dict[str, dict[str, Any]] = field(default_factory=dict)
    speedups: dict[str, dict[str, str]] = field(default_factory=dict)
    reference: str = "teacher"
    noise: str | None = None
    files: dict[str, str] = field(default_factory=dict)
    timed_on: str | None = None
    hardware: str | None = None
    max_length: int | None = None
    image_shape: list[int] | None = None


def _latency_rows(latency_ms: dict | None, deployment: Deployment | None = None) -> list[str]:
    """``latency_ms``: {batch size: median milliseconds per call} (or the per-batch-size entries of
    metrics.json, whose ``median_ms`` is used); with ``deployment``, the speedup over the teacher too."""
    rows = []
    for batch_size, value in (latency_ms or {}).items():
        median = value.get("median_ms") if isinstance(value, dict) else value
        if _number(median):
            speedup = f" {_speedup(deployment, 'student', batch_size)} |" if deployment else ""
            rows.append(f"| {batch_size} | {median:.2f} |{speedup}")
    return rows


def _speedup(deployment: Deployment, form: str, batch_size: Any) -> str:
    return deployment.speedups.get(form, {}).get(str(batch_size), "n/a")


def _speed(latency_ms: dict | None, deployment: Deployment | None) -> list[str]:
    """The student's latency per batch size; with ``deployment``: what it was timed on and where, its speedup
    over the reference with the interval, and the noise warning of the measurement."""
    rows = _latency_rows(latency_ms, deployment)
    if not rows:
        return []
    if deployment is None:
        return ["Student latency on the evaluation machine (median milliseconds per call):", "",
                "| Batch size | Median ms |", "|---|---|", *rows, ""]
    reference = deployment.reference
    where = "".join([f", timed at {deployment.timed_on}" if deployment.timed_on else "",
                     f" on {deployment.hardware}" if deployment.hardware else ""])
    lines = ["## Speed", "", f"Student latency (median milliseconds per call){where}, measured interleaved with "
             f"the {reference} in one process:", "",
             f"| Batch size | Median ms | Speedup over the {reference} [95% CI] |", "|---|---|---|", *rows, "",
             f"Speedup = {reference} median / student median; the interval is a 95% paired bootstrap over "
             "measurement rounds.", ""]
    return lines + ([f"**Warning: {deployment.noise}**", ""] if deployment.noise else [])


def _metrics_table(metrics: dict, teacher_metrics: dict, main_metric: str) -> list[str]:
    names = [main_metric] if main_metric in metrics or main_metric in teacher_metrics else []
    names += [k for k in [*metrics, *teacher_metrics] if k not in names and (
        _number(metrics.get(k)) or _number(teacher_metrics.get(k)))]
    lines = ["| Metric | Student | Teacher | Retention |", "|---|---|---|---|"]
    for name in dict.fromkeys(names):
        student, teacher = metrics.get(name), teacher_metrics.get(name)
        retention = 100.0 * student / teacher if _number(student) and _number(teacher) and teacher else None
        shown = f"**{name}** (main)" if name == main_metric else name
        lines.append(f"| {shown} | {_fmt(student)} | {_fmt(teacher)} | "
                     f"{f'{retention:.1f}%' if retention is not None else 'n/a'} |")
    return lines


def _usage(student_dir: Path, pipeline_tag: str, label_names: list[str] | None) -> list[str]:
    if (student_dir / _VISION_META).is_file():
        meta = json.loads((student_dir / _VISION_META).read_text())
        classes = meta.get("num_classes") or (len(label_names) if label_names else "NUM_CLASSES")
        return ["A kdforge built-in vision net (`model.safetensors` + `kdforge_model.json` naming the "
                f"architecture, `{meta.get('arch')}`); kdforge rebuilds it:", "", "```python",
                "import torch", "from kdforge.models.loading import load_vision_export", "",
                f'model_path = "{_PATH_PLACEHOLDER}"',
                f"model = load_vision_export(model_path, num_classes={classes}).model.eval()",
                "images = torch.rand(1, 3, 32, 32)  # (N, C, H, W), normalised as in training",
                "with torch.no_grad():", "    predicted = model(images).argmax(-1)", "```"]
    if pipeline_tag == "text-generation":
        auto = "AutoModelForCausalLM"
        call = 'generator = pipeline("text-generation", model=model_path)\nprint(generator("The", max_new_tokens=20))'
    else:
        auto = "AutoModelForSequenceClassification"
        call = (f'classifier = pipeline("{pipeline_tag}", model=model_path)\n'
                'print(classifier("A sentence to classify."))')
    return ["A standard Hugging Face Transformers folder (weights, config and tokenizer):", "", "```python",
            f"from transformers import AutoTokenizer, {auto}, pipeline", "",
            f'model_path = "{_PATH_PLACEHOLDER}"  # or its Hub repo id once uploaded',
            "tokenizer = AutoTokenizer.from_pretrained(model_path)",
            f"model = {auto}.from_pretrained(model_path)", "", call, "```"]


def _forms_table(deployment: Deployment, main_metric: str) -> list[str]:
    """The student's forms side by side: file, main metric, MB on disk, median ms and speedup per batch size."""
    sizes = sorted({int(bs) for report in deployment.forms.values()
                    for bs in (report.get("latency") or {}).get("batch_sizes", {})})
    lines = ["| Form | File | " + " | ".join([main_metric, "MB on disk", *(f"b{bs} median ms | b{bs} speedup [95% CI]"
                                                                              for bs in sizes)]) + " |",
             "|---" * (4 + 2 * len(sizes)) + "|"]
    for name, report in deployment.forms.items():
        per_bs = (report.get("latency") or {}).get("batch_sizes", {})
        cells = [name, f"`{deployment.files[name]}`" if name in deployment.files else "this folder",
                 _fmt((report.get("metrics") or {}).get(main_metric)), _fmt(report.get("size_mb"), 1)]
        for bs in sizes:
            median = (per_bs.get(str(bs)) or {}).get("median_ms")
            cells += [_fmt(median, 2), _speedup(deployment, name, bs)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _onnx_usage(deployment: Deployment, vision: bool) -> list[str]:
    """An onnxruntime snippet that runs the int8 file (else the fp32 one): with the tokenizer for text, on an
    (N, C, H, W) float array for vision."""
    names = sorted(deployment.files, key=lambda name: "int8" not in name)  # the int8 form first: the one to ship
    path = f"{_EXPORTS_PLACEHOLDER}/{deployment.files[names[0]]}"
    others = ", ".join(f"`{deployment.files[n]}` ({n})" for n in names[1:])
    head = [f"The ONNX files are in the run folder's `exports/` (beside this folder); run "
            f"`{deployment.files[names[0]]}` ({names[0]}) with onnxruntime on the CPU"
            f"{f' (or {others})' if others else ''}:", "", "```python",
            "import numpy as np", "import onnxruntime as ort"]
    session = f'session = ort.InferenceSession("{path}", providers=["CPUExecutionProvider"])'
    if vision:
        shape = ", ".join(map(str, deployment.image_shape or [3, 32, 32]))
        return [*head, "", session, f"images = np.random.rand(1, {shape}).astype(np.float32)  # (N, C, H, W), "
                "normalised as in training", "logits = session.run(None, {session.get_inputs()[0].name: images})[0]",
                "predicted = logits.argmax(-1)", "```"]
    truncate = f", max_length={deployment.max_length}" if deployment.max_length else ""
    return [*head, "from transformers import AutoTokenizer", "",
            f'tokenizer = AutoTokenizer.from_pretrained("{_PATH_PLACEHOLDER}")', session,
            f'batch = tokenizer(["A sentence to classify."], padding=True, truncation=True{truncate}, '
            'return_tensors="np")',
            "feeds = {i.name: batch[i.name].astype(np.int64) for i in session.get_inputs()}",
            "logits = session.run(None, feeds)[0]", "predicted = logits.argmax(-1)", "```"]


def write_model_card(student_dir: Path, *, task_name: str, metrics: dict, teacher_metrics: dict, main_metric: str,
                     teacher_source: str, objectives: list[str], student_description: str, params: int,
                     size_mb: float, latency_ms: dict | None, label_names: list[str] | None,
                     base_model: str | None, command: str | None,
                     pipeline_tag: str = "text-classification", deployment: Deployment | None = None) -> Path:
    """Write ``student_dir/README.md``: Hub metadata (one ``model-index`` result per numeric student
    metric), the student/teacher table with retention, the student's speed, its deployment forms, the
    distillation recipe and loading snippets (the ONNX files' too).

    ``base_model`` goes into the metadata only when it is a Hub id (a local folder is not one);
    ``latency_ms`` maps batch sizes to median milliseconds per call; ``deployment``: what the student was
    timed on and where, its speedup and the ONNX forms (:class:`Deployment`)."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    student_dir = Path(student_dir)
    vision = (student_dir / _VISION_META).is_file()
    if vision:
        pipeline_tag = "image-classification"
    hub = _HUB_DATASETS.get(task_name)
    dataset_type, dataset_name, dataset_config, split = hub or (task_name, task_name, None, None)
    numeric = {k: v for k, v in metrics.items() if _number(v)}
    eval_results = [EvalResult(task_type=pipeline_tag, dataset_type=dataset_type, dataset_name=dataset_name,
                               dataset_config=dataset_config, dataset_split=split, metric_type=name,
                               metric_value=float(value)) for name, value in numeric.items()]
    model_name = f"kdforge-{task_name.replace('/', '-')}-student"
    data = ModelCardData(model_name=model_name, eval_results=eval_results or None,
                         library_name=None if vision else "transformers", pipeline_tag=pipeline_tag,
                         tags=["knowledge-distillation", "kdforge", *(["pytorch"] if vision else [])],
                         datasets=[hub[0]] if hub else None, metrics=list(numeric) or None,
                         base_model=base_model if _is_hub_id(base_model) else None)

    body = [f"# {model_name}", "",
            f"A student model distilled with kdforge (knowledge distillation) from `{teacher_source}` on "
            f"`{task_name}`{f' ({dataset_name}, {split} split)' if hub else ''}.", "",
            "## Results", "", *_metrics_table(metrics, teacher_metrics, main_metric), "",
            "Retention = 100 * student / teacher.", "",
            f"Student size: {params / 1e6:.2f} M parameters, {size_mb:.1f} MB.", ""]
    body += _speed(latency_ms, deployment)
    if deployment is not None and deployment.files:
        body += ["## Deployment forms", "", *_forms_table(deployment, main_metric), ""]
    body += ["## How it was distilled", "", f"- Teacher: `{teacher_source}`",
             f"- Student: {student_description}",
             f"- Objectives: {', '.join(f'`{o}`' for o in objectives) if objectives else 'n/a'}"]
    if label_names:
        body.append(f"- Labels: {', '.join(f'{i} = `{name}`' for i, name in enumerate(label_names))}")
    if command:
        body += ["", "Reproduce it with:", "", f"```{'python' if command.startswith('import ') else 'bash'}", command,
                 "```"]
    body += ["", "## How to use it", "", *_usage(student_dir, pipeline_tag, label_names), ""]
    if deployment is not None and deployment.files:
        body += ["### ONNX and int8", "", *_onnx_usage(deployment, vision), ""]

    card = ModelCard(f"---\n{data.to_yaml()}\n---\n" + "\n".join(body))
    return atomic_write_text(student_dir / "README.md", str(card))
