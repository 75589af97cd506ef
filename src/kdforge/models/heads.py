"""Classification heads: read their size and replace them (Pea-KD's PTP stage trains a 4-class
head, then the task stage starts from a fresh task head)."""

from __future__ import annotations

from torch import nn

from kdforge.errors import KDForgeError

#: attribute names of the output layer, tried in order (HF classifiers, RoBERTa-style heads, CNNs)
HEAD_PATHS = ("classifier.out_proj", "classifier", "score", "fc")


def head_path(model: nn.Module) -> str:
    for path in HEAD_PATHS:
        try:
            if isinstance(model.get_submodule(path), nn.Linear):
                return path
        except AttributeError:
            continue
    raise KDForgeError(f"cannot find the classification head of {type(model).__name__} "
                       f"(looked for a Linear at {', '.join(HEAD_PATHS)})")


def head_size(model: nn.Module) -> int:
    return model.get_submodule(head_path(model)).out_features


def classifier_size(model: nn.Module) -> int | None:
    """:func:`head_size`, or None for a model without a classification head (a language model)."""
    try:
        return head_size(model)
    except KDForgeError:
        return None


def replace_head(model: nn.Module, num_labels: int, label_names: list[str] | None = None) -> None:
    """A freshly initialised output layer with ``num_labels`` outputs (config updated for HF models)."""
    path = head_path(model)
    old: nn.Linear = model.get_submodule(path)
    new = nn.Linear(old.in_features, num_labels, bias=old.bias is not None).to(old.weight.device)
    if hasattr(model, "_init_weights"):
        model._init_weights(new)
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, new)
    if hasattr(model, "config"):
        model.config.num_labels = num_labels
        names = label_names or [f"LABEL_{i}" for i in range(num_labels)]
        model.config.id2label = dict(enumerate(names))
        model.config.label2id = {n: i for i, n in enumerate(names)}
    if hasattr(model, "num_labels"):
        model.num_labels = num_labels
