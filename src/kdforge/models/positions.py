"""How many tokens a model with learned absolute position embeddings can read.

BERT-like models look positions up in a table of ``max_position_embeddings`` rows (GPT-2: ``wpe``);
a longer input fails inside the embedding lookup, possibly only when the first long text comes
along, after hours of training. RoBERTa-like tables start counting at ``padding_idx + 1`` (514 rows
hold 512 positions); OPT-like tables carry an ``offset``. Models with rotary or relative positions
have no such table and no hard limit (None).
"""

from __future__ import annotations

from torch import nn

from kdforge.errors import KDForgeError

_TABLE_NAMES = ("position_embeddings", "wpe", "embed_positions")


def position_limit(model: nn.Module) -> int | None:
    """The longest input ``model`` can embed, from its absolute position table; None if it has none."""
    limits = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and name.rsplit(".", 1)[-1] in _TABLE_NAMES:
            first = module.padding_idx + 1 if module.padding_idx is not None else 0
            limits.append(module.num_embeddings - first - int(getattr(module, "offset", 0) or 0))
    return min(limits) if limits else None


def check_max_length(model: nn.Module, length: int | None, config_key: str, source: str) -> None:
    """One line when inputs of ``length`` tokens (``config_key``) exceed what ``model`` can embed."""
    limit = position_limit(model)
    if length is not None and limit is not None and length > limit:
        raise KDForgeError(f"`{config_key}` is {length} but {source} has position embeddings for {limit} tokens; "
                           f"set {config_key} to {limit} or less")
