"""Build a student: from the teacher's own layers, from a resized teacher config, from the teacher's
layers sliced to narrower widths, or given.

Layer selection (DistilBERT, Sanh et al. 2019; PKD, Sun et al. 2019): the student has the
teacher's architecture with ``len(layers)`` transformer layers; student layer j starts from
teacher layer ``layers[j]``, and everything outside the layer stack (embeddings, pooler, head)
is copied. The student keeps the teacher's tokenizer.

Sliced initialisation (a narrower, shallower student, as searched by KD-NAS, Trivedi et al. 2023):
the chosen teacher layers, then every tensor cut to its leading indices (:func:`student_sliced`).

Layers of another model (``student.model`` with ``student.layers``, and ``teacher.layers``): that model cut
to those layers the same way (:func:`keep_layers`), e.g. one pre-trained student for teachers of any depth.
"""

from __future__ import annotations

import copy
import logging
import re

from huggingface_hub.errors import StrictDataclassError
from torch import nn

from kdforge.config import StudentConfig
from kdforge.errors import KDForgeError
from kdforge.models.adapter import is_hf_model
from kdforge.models.layer_stack import layer_stack_path
from kdforge.models.loading import LoadedModel, load_model
from kdforge.models.positions import check_max_length
from kdforge.models.sps import make_sps_student
from kdforge.models.vocab import drop_vocabulary_state

log = logging.getLogger("kdforge")


def student_from_layers(teacher: nn.Module, layers: list[int], key: str = "student.layers") -> nn.Module:
    """A copy of ``teacher`` keeping only the transformer layers ``layers`` (in that order); ``key`` names
    the setting in errors."""
    n = teacher.config.num_hidden_layers
    bad = [i for i in layers if not 0 <= i < n]
    if bad or not layers:
        raise KDForgeError(f"{key} {layers} must be a non-empty list of layer indices 0..{n - 1} of the model it "
                           "is cut from")
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(layers)
    drop_vocabulary_state(config)  # the student speaks the teacher's vocabulary, even a compressed one
    student = type(teacher)(config)
    source, teacher_state = _layer_source(teacher, layers), teacher.state_dict()
    student.load_state_dict({key: teacher_state[source(key)].clone() for key in student.state_dict()})
    return student


def student_from_config(teacher: nn.Module, overrides: dict) -> nn.Module:
    """A freshly initialised model of the teacher's class with config fields overridden
    (``hidden_size``, ``num_hidden_layers``, ``intermediate_size``, ``num_attention_heads``...)."""
    config = override_config(teacher.config, overrides)
    drop_vocabulary_state(config)  # the student speaks the teacher's vocabulary, even a compressed one
    try:
        return type(teacher)(config)
    except (ValueError, RuntimeError, TypeError, StrictDataclassError) as err:
        raise KDForgeError(f"student.config {overrides} is not a valid model: {str(err).splitlines()[0]}") from None


def evenly_spaced_layers(n_teacher: int, n_student: int) -> list[int]:
    """``n_student`` teacher layer indices spread evenly over ``0..n_teacher-1``, first and last kept:
    ``round(j (N - 1) / (L - 1))`` for ``j = 0..L-1`` (Python's ``round``: halves go to the even index),
    and ``[N - 1]`` for ``L = 1``. 2 of 6 gives ``[0, 5]``, 3 of 6 ``[0, 2, 5]``; strictly increasing."""
    if not 1 <= n_student <= n_teacher:
        raise KDForgeError(f"cannot pick {n_student} student layers from a {n_teacher}-layer teacher; "
                           f"choose 1..{n_teacher} layers")
    if n_student == 1:
        return [n_teacher - 1]
    picked = [round(j * (n_teacher - 1) / (n_student - 1)) for j in range(n_student)]
    assert all(a < b for a, b in zip(picked, picked[1:], strict=False)), picked  # L <= N: steps >= 1
    return picked


def _layer_source(teacher: nn.Module, layers: list[int]):
    """A function mapping a student parameter name to the teacher's (student layer j -> ``layers[j]``)."""
    pattern = re.compile(rf"^{re.escape(layer_stack_path(teacher))}\.(\d+)\.(.*)$")

    def source(key: str) -> str:
        match = pattern.match(key)
        return f"{key[:match.start(1)]}{layers[int(match.group(1))]}.{match.group(2)}" if match else key

    return source


def student_sliced(teacher: nn.Module, layers: list[int], overrides: dict) -> nn.Module:
    """Teacher layers ``layers`` (as :func:`student_from_layers`), every weight then sliced to the widths
    of ``overrides`` (``student.layers`` + ``student.config``; a KD-NAS candidate, Trivedi et al. 2023).

    The student is the teacher's class with ``override_config(teacher.config, overrides)`` and
    ``len(layers)`` layers; each student tensor ``W_s`` of shape ``(d_0, d_1, ...)`` is the teacher's
    ``W_t[:d_0, :d_1, ...]``: the first H hidden dimensions, the first F feed-forward units, the first
    rows/columns of Q/K/V/O; embeddings keep every vocabulary row and their first H columns; LayerNorm
    its first H entries; the classifier every label and its first H inputs. When ``H / heads`` equals
    the teacher's head size the leading Q/K/V rows are whole teacher heads; otherwise (or for fused
    QKV projections) the slice is still a valid initialisation, only not head-aligned. A student
    tensor with no teacher counterpart (another name, rank, or a dimension wider than the teacher's)
    keeps its fresh initialisation (logged once)."""
    n = teacher.config.num_hidden_layers
    if not layers or any(not 0 <= i < n for i in layers):
        raise KDForgeError(f"student.layers {layers} must be a non-empty list of teacher layer indices 0..{n - 1}")
    if overrides.get("num_hidden_layers", len(layers)) != len(layers):
        raise KDForgeError(f"student.config.num_hidden_layers is {overrides['num_hidden_layers']} but student.layers "
                           f"picks {len(layers)} layers; drop student.config.num_hidden_layers")
    student = student_from_config(teacher, {**overrides, "num_hidden_layers": len(layers)})
    source, teacher_state = _layer_source(teacher, layers), teacher.state_dict()
    state, fresh = student.state_dict(), []
    for key, tensor in state.items():
        old = teacher_state.get(source(key))
        if old is None or old.dim() != tensor.dim() or any(s > t for s, t in zip(tensor.shape, old.shape, strict=True)):
            fresh.append(key)
            continue
        state[key] = old[tuple(slice(0, d) for d in tensor.shape)].clone()
    student.load_state_dict(state)
    if fresh:
        log.info("sliced student: %d tensor(s) without a teacher counterpart keep their fresh init: %s",
                 len(fresh), ", ".join(fresh))
    return student


def _fits(value, current) -> bool:
    """Whether ``value`` has the kind of a config field now holding ``current`` (None: any)."""
    if value is None or current is None:
        return True
    if isinstance(current, bool):
        return isinstance(value, bool)
    if isinstance(current, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(current, float):
        return isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(current, str):
        return isinstance(value, str)
    return True


def override_config(config, overrides: dict, prefix: str = "student.config"):
    """A copy of an HF ``config`` with ``overrides`` set, each field checked to exist and to keep its
    kind (an integer stays an integer: ``num_hidden_layers: abc`` is one line, not a crash later)."""
    config = copy.deepcopy(config)
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise KDForgeError(f"{prefix}.{key}: {type(config).__name__} has no field {key!r}")
        current = getattr(config, key)
        if not _fits(value, current):
            raise KDForgeError(f"`{prefix}.{key}` is {value!r} but {type(config).__name__}.{key} takes "
                               f"{type(current).__name__} values (the teacher's: {current!r}); fix {prefix}.{key}")
        try:
            setattr(config, key, value)
        except (ValueError, TypeError, StrictDataclassError) as err:
            reason = str(err).strip().splitlines()[-1].strip()
            raise KDForgeError(f"`{prefix}.{key}` is {value!r}: {reason}; fix {prefix}.{key}") from None
    return config


def check_compatible(teacher: LoadedModel, student: LoadedModel) -> None:
    """Teacher and student must agree on the label count and (for text) the tokenizer."""
    t_labels = getattr(getattr(teacher.model, "config", None), "num_labels", None)
    s_labels = getattr(getattr(student.model, "config", None), "num_labels", None)
    if t_labels and s_labels and t_labels != s_labels:
        raise KDForgeError(f"teacher has {t_labels} labels but the student has {s_labels}; "
                           "give a student with the task's label count")
    if teacher.tokenizer is None or student.tokenizer is None:
        return
    probe = "Knowledge distillation keeps 97% of the score, doesn't it?"
    if (teacher.tokenizer.get_vocab() != student.tokenizer.get_vocab()
            or teacher.tokenizer(probe)["input_ids"] != student.tokenizer(probe)["input_ids"]):
        raise KDForgeError(f"the student's tokenizer ({student.source}) differs from the teacher's "
                           f"({teacher.source}); use a student built from the teacher or one with the same vocabulary")


def compress_student_vocabulary(student: LoadedModel, teacher: LoadedModel, texts: list[str],
                                fraction: float) -> LoadedModel:
    """GLMD vocabulary compression of a student built from the teacher: keep ``fraction`` of the
    teacher's words (special tokens and the most frequent in ``texts``), map every dropped word to
    the kept word whose teacher input embedding has the highest dot product with its own, shrink the
    student's embedding and output layers (see :mod:`kdforge.models.vocab`). The student gets its
    own tokenizer; ``word_kd`` restricts the teacher's logits to the kept words."""
    from kdforge.models.vocab import (
        choose_kept_ids,
        compress_vocabulary,
        mapping_targets,
        nearest_kept,
        token_frequencies,
    )

    if student.tokenizer is None or not hasattr(student.model, "get_input_embeddings"):
        raise KDForgeError("student.vocab_fraction needs a text model with an input embedding matrix")
    if not texts:
        raise KDForgeError("student.vocab_fraction: no training text to count word frequencies in")
    tokenizer = teacher.tokenizer
    kept = choose_kept_ids(token_frequencies(tokenizer, texts), tokenizer, fraction)
    mapping = nearest_kept(teacher.model.get_input_embeddings(), kept, mapping_targets(tokenizer, kept))
    model, new_tokenizer = compress_vocabulary(student.model, tokenizer, kept, mapping)
    log.info("student vocabulary compressed to %d of %d words (GLMD)", len(kept), len(tokenizer))
    return LoadedModel(model, new_tokenizer, f"{student.source} (vocabulary {len(kept)})")


def keep_layers(loaded: LoadedModel, layers: list[int], key: str) -> LoadedModel:
    """``loaded`` cut to its transformer layers ``layers`` (``key``: the setting, for errors)."""
    if not is_hf_model(loaded.model):
        raise KDForgeError(f"{key} cuts a Hugging Face transformer to some of its layers, but {loaded.source} is not "
                           "one; for vision nets pick a smaller vision:NAME")
    model = student_from_layers(loaded.model, layers, key)
    return LoadedModel(model, loaded.tokenizer, f"{loaded.source} layers {layers}", loaded.fresh_head)


def build_student(config: StudentConfig, teacher: LoadedModel, task, texts: list[str] | None = None) -> LoadedModel:
    """The student ``config`` asks for; ``texts`` (the training text) are needed for ``vocab_fraction``."""
    if config.model is not None:
        student = load_model(config.model, task, "student.model")
        if config.layers is not None:
            student = keep_layers(student, config.layers, "student.layers")
        check_compatible(teacher, student)
    elif not is_hf_model(teacher.model):
        raise KDForgeError("student.layers / student.config need a Hugging Face teacher; "
                           "for vision teachers set student.model: vision:NAME")
    else:
        if config.layers is not None and config.config is not None:
            model = student_sliced(teacher.model, config.layers, config.config)
        elif config.layers is not None:
            model = student_from_layers(teacher.model, config.layers)
        else:
            model = student_from_config(teacher.model, config.config)
        student = LoadedModel(model, teacher.tokenizer, f"student of {teacher.source}")
        check_max_length(model, getattr(getattr(task, "config", None), "max_length", None), "task.max_length",
                         "the student")
    if config.sps:
        make_sps_student(student.model, config.sps)
        student.source += f" (SPS {config.sps})"
    if config.vocab_fraction is not None:
        student = compress_student_vocabulary(student, teacher, texts or [], config.vocab_fraction)
    return student
