"""Checks run before a job touches the disk or trains: everything that can be known from the
config, the environment and the models' config files (not their weights).

``check_job`` refuses, in one line each: ``train.device: cuda`` without a GPU, an ``output_dir``
or cache folder that is a file or not writable, bad objective settings (negative weights, schedule
mistakes), a model that is missing, truncated or only on an unreachable hub, ``student.config``
values of the wrong kind, and lengths (``task.max_length``, ``eval.latency_seq_len``...) beyond a
model's position embeddings. Models are instantiated on the ``meta`` device only, so the check
costs a config read, not a model load. Black-box teachers: a URL that is malformed or refuses
connections, a predictions file that is missing, a callable that cannot be found, a cache folder that
is a file, a non-classification task, and a student that is not a ``student.model`` of its own.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from kdforge.config import JobConfig, StudentConfig
from kdforge.errors import KDForgeError
from kdforge.models.integrity import check_weight_files
from kdforge.paths import cache_dir, check_writable_folder
from kdforge.roles.base import teacher_capabilities, teacher_key

#: the task names whose data kdforge decodes into its cache folder
_CACHED_DATA_TASKS = ("cifar10", "image_folder")


def check_device(device: str, config_key: str = "train.device") -> None:
    """``cuda`` must mean a GPU: refuse it when torch sees none instead of training on the CPU."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise KDForgeError(f"`{config_key}` is cuda but no CUDA GPU is available (torch.cuda.is_available() is "
                           f"False); set {config_key} to auto or cpu, or run on a machine with a GPU")


def check_devices(config: JobConfig) -> None:
    check_device(config.train.device)
    for i, stage in enumerate(config.stages or []):
        if "device" in stage.train:
            check_device(config.stage_train(stage).device, f"stages.{i}.train.device")


def check_folders(config: JobConfig, command: str) -> None:
    """``output_dir`` and the cache folders the job will write to."""
    check_writable_folder(config.output_dir, "output_dir")
    if command != "distill":
        return
    if config.teacher_cache.enabled:
        folder = config.teacher_cache.folder
        check_writable_folder(Path(folder) if folder else cache_dir(), "teacher_cache.folder" if folder
                              else "KDFORGE_CACHE")
    if config.task.name in _CACHED_DATA_TASKS:
        check_writable_folder(cache_dir(), "KDFORGE_CACHE")


def check_objectives(config: JobConfig) -> None:
    """Every term's parameters, weight (sign and schedule) without building any model."""
    from kdforge.objectives.base import objective_params
    from kdforge.objectives.composite import check_weight_sign
    from kdforge.objectives.schedules import make_schedule

    for s, stage in enumerate(config.all_stages()):
        prefix = f"stages.{s}." if config.stages else ""
        for i, term in enumerate(stage.objectives):
            cls, _ = objective_params(term, i)
            check_weight_sign(cls, term.name, term.weight, f"{prefix}objectives.{i}.weight")
            make_schedule(term.weight, f"{prefix}objectives.{i}.weight")


# ---------------------------------------------------------------------------- models


def _is_hf_spec(spec: str) -> bool:
    from kdforge.models.loading import VISION_META

    return not spec.startswith("vision:") and not (Path(spec) / VISION_META).is_file()


def _hf_config(spec: str, config_key: str):
    """The model's HF config (its weights checked for truncation on the way); None for a GGUF file."""
    from transformers import AutoConfig

    from kdforge.models.loading import gguf_file, resolve_model_source

    check_weight_files(spec)
    source = resolve_model_source(spec, config_key)
    if Path(source).is_dir() and gguf_file(Path(source)):
        return None
    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise KDForgeError(f"cannot read the config of {spec!r} ({config_key}): {str(err).splitlines()[0]}; "
                           "fix the model in the config") from None


def _meta_model(hf_config, causal: bool):
    """The model ``hf_config`` describes, on the meta device (no memory, no weights)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    with torch.device("meta"):
        return (AutoModelForCausalLM if causal else AutoModelForSequenceClassification).from_config(hf_config)


def _lengths(config: JobConfig, command: str) -> list[tuple[str, int]]:
    """The input lengths (config key, tokens) the job will feed its text models."""
    from kdforge.recipes.catalog import data_source_for

    found = [("task.max_length", config.task.max_length)]
    if config.task.corpus is not None:
        found.append(("task.corpus.max_length", config.task.corpus.max_length))
    for i, stage in enumerate(config.stages or []):
        found += [(f"stages.{i}.{stage.data}.{key}", n) for key, n in data_source_for(stage, i).input_lengths().items()]
    if command == "distill" and config.eval.latency_seq_len is not None:  # else task.max_length, checked above
        found.append(("eval.latency_seq_len", config.eval.latency_seq_len))
    return found


def _check_positions(model: Any, lengths: list[tuple[str, int]], what: str) -> None:
    from kdforge.models.positions import check_max_length

    for key, length in lengths:
        check_max_length(model, length, key, what)


def _check_built(hf_config, causal: bool, lengths: list[tuple[str, int]], what: str, config_key: str) -> None:
    """Instantiate ``hf_config`` on the meta device; refuse invalid combinations and long inputs."""
    from huggingface_hub.errors import StrictDataclassError

    try:
        model = _meta_model(hf_config, causal)
    except (ValueError, TypeError, StrictDataclassError) as err:
        raise KDForgeError(f"{config_key} is not a valid model: {str(err).strip().splitlines()[0]}") from None
    _check_positions(model, lengths, what)


def check_layers(layers: list[int] | None, hf_config, key: str, model_key: str) -> None:
    """``layers`` (a setting that cuts a model to some of its layers) are layers of the model's config."""
    depth = getattr(hf_config, "num_hidden_layers", None)
    if layers is None or depth is None:
        return
    bad = [i for i in layers if not 0 <= i < depth]
    if bad:
        raise KDForgeError(f"{key}: {bad[0]} is not a layer of {model_key}, which has {depth} (indices 0 to "
                           f"{depth - 1})")


def check_learner(learner: StudentConfig, prefix: str, teacher_config, causal: bool,
                  lengths: list[tuple[str, int]]) -> None:
    """A student or assistant: its own model, or the teacher's config with ``config`` overrides."""
    from kdforge.models.student import override_config

    if learner.model is not None:
        if not _is_hf_spec(learner.model):
            check_weight_files(learner.model)
        else:
            hf_config = _hf_config(learner.model, f"{prefix}.model")
            if hf_config is not None:
                _check_built(hf_config, causal, lengths, f"{prefix}.model {learner.model!r}", f"{prefix}.model")
                check_layers(learner.layers, hf_config, f"{prefix}.layers", f"{prefix}.model")
        return
    depth_of_teacher = getattr(teacher_config, "num_hidden_layers", None)
    if learner.layers is not None and depth_of_teacher is not None:
        bad = [i for i in learner.layers if not 0 <= i < depth_of_teacher]
        if bad:  # found now, not after the teacher's fine-tuning
            raise KDForgeError(f"{prefix}.layers: {bad[0]} is not a layer of the teacher, which has "
                               f"{depth_of_teacher} (indices 0 to {depth_of_teacher - 1})")
    if learner.config is not None and teacher_config is not None:
        depth = {"num_hidden_layers": len(learner.layers)} if learner.layers is not None else {}  # sliced
        merged = override_config(teacher_config, {**depth, **learner.config}, f"{prefix}.config")
        _check_built(merged, causal, lengths, f"the {prefix} ({prefix}.config)", f"{prefix}.config")


def check_models(config: JobConfig, command: str) -> None:
    """Teachers, student and assistants: found, intact, reachable, and long enough for the inputs."""
    from kdforge.tasks.base import TASKS, task_problem

    task_cls = TASKS.get(config.task.name, "task.name")
    text = getattr(task_cls, "modality", "text") == "text"
    causal = task_problem(config.task).causal_lm
    lengths = _lengths(config, command) if text else []
    teachers = config.teacher_configs()
    first_config = None
    for role, teacher in teachers.items():
        key = f"{teacher_key(role)}.model"
        if not teacher_capabilities(teacher).weights:
            continue  # no model files: check_black_boxes
        if not _is_hf_spec(teacher.model):
            check_weight_files(teacher.model)
            continue
        hf_config = _hf_config(teacher.model, key)
        if hf_config is not None:
            _check_built(hf_config, causal, lengths, f"{key} {teacher.model!r}", key)
            check_layers(teacher.layers, hf_config, f"{teacher_key(role)}.layers", key)
            if teacher.layers is not None:  # the students are built from the cut teacher
                hf_config = copy.deepcopy(hf_config)
                hf_config.num_hidden_layers = len(teacher.layers)
            first_config = first_config or hf_config
    if command != "distill":
        return
    learners = {"student": config.student} if config.student is not None else {}
    learners.update({f"assistants.{name}": a for name, a in config.assistants.items()})
    for prefix, learner in learners.items():
        check_learner(learner, prefix, first_config, causal, lengths)


def check_trackers(config: JobConfig) -> None:
    """Every tracker of ``train.trackers`` (and of a stage's own) is installed."""
    from kdforge.engine.tracking import resolve_trackers

    resolve_trackers(config.train.trackers, "train.trackers")
    for i, stage in enumerate(config.stages or []):
        if "trackers" in stage.train:
            resolve_trackers(config.stage_train(stage).trackers, f"stages.{i}.train.trackers")


def check_exports(config: JobConfig) -> None:
    """ONNX export and the sharpness measure are for classifiers and regressors (text and vision), not
    language models."""
    from kdforge.tasks.base import task_problem

    causal = task_problem(config.task).causal_lm
    if config.eval.sharpness and causal:
        raise KDForgeError(f"eval.sharpness: task {config.task.name} trains a language model, whose sharpness "
                           "kdforge does not measure; set eval.sharpness: false")
    if config.export.onnx and causal:
        raise KDForgeError(f"export.onnx: task {config.task.name} trains a language model, which kdforge does not "
                           "export to ONNX (sequence classifiers and vision nets only); set export.onnx: false")


def _check_reachable(url: str, timeout_s: float, key: str) -> None:
    """A TCP connection to the URL's host and port opens (skipped when a proxy would carry the request)."""
    import socket
    import urllib.parse
    import urllib.request

    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if urllib.request.getproxies().get(parts.scheme) and host not in ("127.0.0.1", "localhost", "::1") \
            and not urllib.request.proxy_bypass(host):
        return
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=min(timeout_s, 10.0)).close()
    except OSError as err:
        raise KDForgeError(f"black-box teacher {url} is unreachable ({err.strerror or err}); start the server or "
                           f"fix {key}.url") from None


def check_black_boxes(config: JobConfig, command: str, black_boxes=None) -> None:
    """Every black-box teacher: its source (URL syntax and reachability, predictions file, callable) and cache
    folder; a classification task; and learners of their own (``student.model``) when the primary teacher is
    a black box (the teacher's layers, config and vocabulary are not visible)."""
    from kdforge.blackbox.clients import HttpTeacher
    from kdforge.blackbox.teacher import cache_folder, resolve_callable
    from kdforge.tasks.base import task_problem

    teachers = config.teacher_configs()
    black = {role: t.black_box for role, t in teachers.items() if teacher_capabilities(t).queried}
    if not black or command != "distill":
        return
    problem = task_problem(config.task)
    if not problem.classes:
        raise KDForgeError(f"task {config.task.name} is a {problem.name} task but a black-box teacher answers class "
                           "probabilities; use a classification task or a teacher `model`")
    if next(iter(teachers)) in black:
        learners = {"student": config.student} if config.student is not None else {}
        learners.update({f"assistants.{name}": a for name, a in config.assistants.items()})
        for prefix, learner in learners.items():
            if learner.model is None:
                raise KDForgeError(f"{prefix}: a learner of a black-box teacher must be `{prefix}.model` (a model "
                                   "of its own): the teacher's layers and config are not visible")
            if learner.vocab_fraction is not None:
                raise KDForgeError(f"{prefix}.vocab_fraction compresses the vocabulary with the teacher's "
                                   "embeddings, which a black-box teacher does not show; remove it")
    for role, spec in black.items():
        key = f"{teacher_key(role)}.black_box"
        check_writable_folder(cache_folder(spec), f"{key}.cache_dir" if spec.cache_dir else "KDFORGE_CACHE")
        if spec.url is not None:
            HttpTeacher(spec.url, 1, timeout_s=spec.timeout_s, retries=spec.retries,
                        rate_limit_per_s=spec.rate_limit_per_s, batch_size=spec.batch_size)  # URL syntax
            _check_reachable(spec.url, spec.timeout_s, key)
        elif spec.file is not None and not Path(spec.file).expanduser().is_file():
            raise KDForgeError(f"{key}.file {spec.file} does not exist; give the JSON-lines file of the "
                               "teacher's predictions")
        elif spec.callable is not None:
            resolve_callable(spec.callable, black_boxes, key)


def check_job(config: JobConfig, command: str = "distill", black_boxes=None) -> None:
    """Everything ``kdforge distill`` (``command="distill"``, also the demo) or ``kdforge finetune``
    (``"finetune"``) can refuse before it writes a file or trains a step; one KDForgeError line.
    ``black_boxes``: the functions registered by name for ``black_box.callable``."""
    check_devices(config)
    check_trackers(config)
    check_exports(config)
    check_folders(config, command)
    check_black_boxes(config, command, black_boxes)
    if command == "distill":
        check_objectives(config)
    check_models(config, command)
