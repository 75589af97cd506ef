"""GLMD vocabulary compression: keep the frequent words, let each dropped word stand in for its nearest kept one.

Tan, Tam, Wang, Gong, Zhao, Zhang & Tang (Findings of ACL 2023), "Are Intermediate Layers and Labels
Really Necessary? A General Language Model Distillation Method" (GLMD). Word frequencies are long-tailed,
so GLMD shrinks the vocabulary (the number of rows), not the embedding width: it keeps a fraction of
the words (``--map_vocab_size=0.5``: half), the most frequent ones in the corpus plus the special
tokens, and maps every dropped word to the kept word whose teacher input embedding has the highest dot
product with its own (``--student_map_vocab_method=decoder``: the teacher's embeddings read as a
decoder, argmax_k e_t(w) . e_t(k)). The student's input embedding and output layer keep only the kept
rows; the teacher's logits are restricted to the kept words (``restrict_teacher_logits``, used by the
``word_kd`` objective).

    freqs = token_frequencies(tokenizer, texts)
    kept = choose_kept_ids(freqs, tokenizer, fraction=0.5)
    mapping = nearest_kept(teacher.get_input_embeddings().weight, kept, targets=mapping_targets(tokenizer, kept))
    student, new_tokenizer = compress_vocabulary(student, tokenizer, kept, mapping)
    # train with word_kd (it reads kept_ids_of(student));
    # the student reads remap_ids(input_ids, id_map_of(student))
    student.save_pretrained(out); new_tokenizer.save_pretrained(out)   # loads in plain transformers

The compression's state lives in the student: ``student.config.kdforge_vocab`` (``{"format": 1,
"kept_ids": [...], "id_map": [...]}``, written to ``config.json`` by ``save_pretrained``, so a reloaded
student carries it) and, on the compressed model, the non-persistent buffers ``kdforge_vocab_map`` and
``kdforge_id_map`` (not in the state dict: the weights files are those of a plain model).
:func:`kept_ids_of` and :func:`id_map_of` read it from either.

New ids are positions in ``kept`` (new id i is teacher id ``kept[i]``). ``kept`` lists the special
tokens first, then the other kept words by decreasing frequency (ties by id), as the official
``vocab_sort.py`` does (it orders its always-kept tokens by frequency too; we order them by id).

The exported tokenizer is the original one with its vocabulary rewritten so that every original
token string encodes to the new id of its kept stand-in (several strings share an id); segmentation is
unchanged, so ``new_tokenizer(text).input_ids == remap_ids(tokenizer(text).input_ids, id_map)``.
What the ``tokenizers`` library does with shared ids, and how this module copes:

* WordPiece / WordLevel look words up by string: any mapping encodes exactly.
* BPE merges look symbols up by id, so two strings sharing an id are the same symbol to every later
  merge: if a dropped token (or the kept token it maps to) is a part of a merge, words are segmented
  differently. ``choose_kept_ids`` therefore also keeps every token that BPE merges are built from,
  ``mapping_targets`` offers only kept tokens that are not merge parts as stand-ins, and
  ``compress_vocabulary`` refuses a mapping that breaks this. Under these conditions encoding is exact.
* Decoding is not faithful: for an id shared by several strings the library keeps one string,
  picked arbitrarily in each process, so decoded text may show a dropped string (even a stray byte)
  where the kept word was meant. Logits, losses and perplexities are exact; generated text is not.
* ``len(new_tokenizer)`` counts strings, not ids (use ``student.config.vocab_size``), and
  re-serialising the backend (a plain ``save_pretrained`` of a reloaded tokenizer, pickling) keeps one
  string per id, losing the others. The tokenizer returned by ``compress_vocabulary`` saves the
  faithful ``tokenizer.json``; copy that file rather than re-saving a reloaded tokenizer.
"""

from __future__ import annotations

import json
import os
import tempfile
import types
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from kdforge.errors import KDForgeError

#: ``model.config`` attribute holding a compressed student's kept ids and id map (saved in config.json)
CONFIG_KEY = "kdforge_vocab"
#: config fields holding token ids that compression renumbers
_ID_FIELDS = ("pad_token_id", "bos_token_id", "eos_token_id", "unk_token_id", "sep_token_id", "cls_token_id",
              "mask_token_id", "decoder_start_token_id")
#: slow-tokenizer vocabulary files that cannot hold a many-to-one vocabulary (removed from exports)
_SLOW_VOCAB_FILES = ("vocab.txt", "vocab.json", "merges.txt")


def token_frequencies(tokenizer, texts: Iterable[str] | str, batch_size: int = 1024) -> Counter:
    """How often each token id occurs in ``texts`` (no special tokens added): ``Counter({id: count})``."""
    if isinstance(texts, str):
        texts = [texts]
    counts: Counter = Counter()
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) >= batch_size:
            _count(tokenizer, batch, counts)
            batch = []
    if batch:
        _count(tokenizer, batch, counts)
    return counts


def _count(tokenizer, batch: list[str], counts: Counter) -> None:
    for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
        counts.update(int(i) for i in ids)


def choose_kept_ids(freqs: Mapping[int, int] | Sequence[int] | torch.Tensor, tokenizer, fraction: float = 0.5,
                    keep_bpe_merge_parts: bool = True) -> torch.Tensor:
    """The teacher ids the student keeps: ``max(floor(fraction * len(tokenizer)), #required)`` of them.

    Required (always kept): the special and added tokens, and, for a BPE tokenizer with
    ``keep_bpe_merge_parts``, every token a BPE merge is built from (a compressed BPE tokenizer cannot
    let those share an id; see the module docstring). The rest of the budget goes to the most frequent
    tokens (``freqs``: a mapping id -> count or a per-id sequence), ties broken by the lower id.
    Order: special/added tokens by ascending id, then the others by decreasing frequency, ties by id."""
    if not 0.0 < float(fraction) <= 1.0:
        raise KDForgeError(f"vocabulary fraction must be in (0, 1], got {fraction}; 0.5 keeps half the words (GLMD)")
    size = len(tokenizer)
    counts = _as_counts(freqs, size)
    specials = sorted(_special_ids(tokenizer, size))
    required = set(specials)
    if keep_bpe_merge_parts:
        required |= _bpe_merge_part_ids(tokenizer)
    budget = max(int(float(fraction) * size), len(required))
    others = sorted((i for i in range(size) if i not in required), key=lambda i: (-counts[i], i))
    chosen = (required - set(specials)) | set(others[: budget - len(required)])
    ordered = specials + sorted(chosen, key=lambda i: (-counts[i], i))
    return torch.tensor(ordered, dtype=torch.long)


def mapping_targets(tokenizer, kept_ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """The kept ids a dropped token may stand in for: not special or added tokens, and for a BPE
    tokenizer not a part of any merge (so the exported tokenizer segments text exactly as before)."""
    kept = torch.as_tensor(kept_ids, dtype=torch.long).reshape(-1)
    excluded = _special_ids(tokenizer, len(tokenizer)) | _bpe_merge_part_ids(tokenizer)
    targets = [int(i) for i in kept.tolist() if int(i) not in excluded]
    if not targets:
        raise KDForgeError("no kept token can stand in for the dropped ones (all are special tokens or BPE merge "
                           "parts); keep a larger fraction of the vocabulary")
    return torch.tensor(targets, dtype=torch.long)


@torch.no_grad()
def nearest_kept(teacher_input_embeddings: torch.Tensor | nn.Module, kept_ids: torch.Tensor | Sequence[int],
                 targets: torch.Tensor | Sequence[int] | None = None, chunk_size: int = 4096) -> torch.Tensor:
    """``mapping[v]`` for every teacher id v: v itself if kept, else the kept id k maximising the dot
    product e_t(v) . e_t(k) of the teacher's input embeddings (GLMD's ``decoder`` similarity; not
    cosine). ``targets`` (a subset of ``kept_ids``, default all) are the ids a dropped token may map
    to; ties go to the first in ``targets`` order."""
    weight = teacher_input_embeddings.weight if isinstance(teacher_input_embeddings, nn.Module) \
        else teacher_input_embeddings
    emb = weight.detach().float()
    if emb.dim() != 2:
        raise KDForgeError(f"teacher input embeddings must be a (vocab, width) matrix, got shape {tuple(emb.shape)}")
    size = emb.shape[0]
    kept = _as_ids(kept_ids, size, "kept_ids")
    cand = kept if targets is None else _as_ids(targets, size, "targets")
    is_kept = torch.zeros(size, dtype=torch.bool)
    is_kept[kept] = True
    if not bool(is_kept[cand].all()):
        raise KDForgeError("every mapping target must be a kept id; pass targets from mapping_targets(tokenizer, kept)")
    mapping = torch.arange(size)
    dropped = (~is_kept).nonzero().reshape(-1)
    cand_emb = emb[cand.to(emb.device)]
    for chunk in dropped.split(chunk_size):
        best = (emb[chunk.to(emb.device)] @ cand_emb.T).argmax(dim=1).cpu()
        mapping[chunk] = cand[best]
    return mapping


def restrict_teacher_logits(logits: torch.Tensor, kept_ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """``logits[..., kept_ids]``: the teacher's scores of the student's words, in student-id order (a
    softmax taken afterwards renormalises over the kept words, as GLMD's ``t_logits[..., kept]``)."""
    kept = torch.as_tensor(kept_ids, dtype=torch.long, device=logits.device).reshape(-1)
    if kept.numel() and (int(kept.max()) >= logits.shape[-1] or int(kept.min()) < 0):
        raise KDForgeError(f"kept vocabulary ids must lie in [0, {logits.shape[-1]}) (the teacher's vocabulary), "
                           f"got up to {int(kept.max())}; the vocabulary map belongs to another teacher")
    return logits.index_select(-1, kept)


def remap_ids(input_ids: torch.Tensor, id_map: torch.Tensor) -> torch.Tensor:
    """Teacher token ids -> the compressed student's ids (``id_map = id_map_of(student)``)."""
    return id_map.to(input_ids.device)[input_ids]


def kept_ids_of(model: nn.Module | None) -> torch.Tensor | None:
    """The teacher ids a compressed student kept, in student-id order (new id i is teacher id
    ``kept[i]``): its ``kdforge_vocab_map`` buffer, else ``config.kdforge_vocab`` (a reloaded student);
    None for a model whose vocabulary was not compressed."""
    return _vocab_state(model, "kdforge_vocab_map", "kept_ids")


def id_map_of(model: nn.Module | None) -> torch.Tensor | None:
    """Teacher id -> compressed-student id (for :func:`remap_ids`), from the ``kdforge_id_map`` buffer
    or ``config.kdforge_vocab``; None for a model whose vocabulary was not compressed."""
    return _vocab_state(model, "kdforge_id_map", "id_map")


def _vocab_state(model: nn.Module | None, buffer: str, field: str) -> torch.Tensor | None:
    if model is None:
        return None
    value = getattr(model, buffer, None)
    if value is not None:
        return value
    stored = getattr(getattr(model, "config", None), CONFIG_KEY, None)
    if isinstance(stored, dict) and stored.get(field) is not None:
        return torch.tensor(stored[field], dtype=torch.long)
    return None


def drop_vocabulary_state(config) -> None:
    """Remove ``config.kdforge_vocab`` (from the config of a *new* model built from a compressed one: it
    speaks that model's vocabulary, so it has no map of its own)."""
    if hasattr(config, CONFIG_KEY):
        delattr(config, CONFIG_KEY)


class StudentIdsCollator:
    """Collates with the teacher's tokenizer, then gives a compressed student its own ids: ``input_ids``
    and token ``labels`` (-100 kept) become ``id_map[teacher id]``; the teacher's ids stay in the batch
    as ``teacher_input_ids`` (teacher ModelAdapters read them). Segmentation is the same for both
    tokenizers, so positions line up one to one."""

    def __init__(self, collate_fn, id_map: torch.Tensor):
        self.collate_fn = collate_fn
        self.id_map = id_map.cpu()

    def __call__(self, examples: list[dict]) -> dict:
        batch = self.collate_fn(examples)
        ids = batch["input_ids"]
        batch["teacher_input_ids"] = ids
        batch["input_ids"] = remap_ids(ids, self.id_map)
        labels = batch.get("labels")
        if labels is not None and labels.shape == ids.shape:
            batch["labels"] = torch.where(labels >= 0, remap_ids(labels.clamp_min(0), self.id_map), labels)
        return batch


def compress_vocabulary(student_model: nn.Module, tokenizer, kept_ids: torch.Tensor | Sequence[int],
                        mapping: torch.Tensor | Sequence[int]):
    """Shrink ``student_model`` (in place) to the kept words and build the matching tokenizer.

    The input embedding and the output layer (``lm_head`` / MLM decoder, and its bias) keep rows
    ``kept_ids`` in that order; tied weights stay tied. ``config.vocab_size`` and the special-token ids
    of the config and generation config are renumbered. The kept teacher ids (read by ``word_kd``) and
    the id map (teacher id -> student id, for ``remap_ids``) are stored in ``config.kdforge_vocab`` and
    as the non-persistent buffers ``kdforge_vocab_map`` and ``kdforge_id_map`` (:func:`kept_ids_of`,
    :func:`id_map_of`). The new tokenizer (same class, a rewritten ``tokenizer.json``) encodes every
    original token string to the new id of ``mapping[its id]``; added/special tokens are renumbered.
    Returns ``(student_model, new_tokenizer)``."""
    emb = student_model.get_input_embeddings()
    if emb is None or not isinstance(getattr(emb, "weight", None), torch.Tensor):
        raise KDForgeError(f"{type(student_model).__name__} has no input embedding matrix to compress")
    rows = emb.weight.shape[0]
    mapping = torch.as_tensor(mapping, dtype=torch.long).reshape(-1).cpu()
    if mapping.numel() < len(tokenizer):
        raise KDForgeError(f"the vocabulary mapping covers {mapping.numel()} ids but the tokenizer has "
                           f"{len(tokenizer)}; build it with nearest_kept on the teacher's input embeddings")
    kept = _as_ids(kept_ids, min(rows, mapping.numel()), "kept_ids")
    new_of = torch.full((mapping.numel(),), -1, dtype=torch.long)
    new_of[kept] = torch.arange(kept.numel())
    if not bool((mapping[kept] == kept).all()):
        raise KDForgeError("a kept id must map to itself; build the mapping with nearest_kept(embeddings, kept)")
    if int(mapping.min()) < 0 or int(mapping.max()) >= mapping.numel():
        raise KDForgeError("the vocabulary mapping points outside the vocabulary; build it with nearest_kept")
    id_map = new_of[mapping]
    if bool((id_map < 0).any()):
        bad = int((id_map < 0).nonzero()[0])
        raise KDForgeError(f"the mapping sends id {bad} to id {int(mapping[bad])}, which is not kept; map dropped ids "
                           "to kept ones only (nearest_kept does)")
    state = _remapped_tokenizer_state(tokenizer, mapping, id_map)
    new_tokenizer = _load_tokenizer(tokenizer, json.dumps(state, ensure_ascii=False))
    _shrink_model(student_model, kept, id_map)
    config = getattr(student_model, "config", None)
    if config is not None:
        setattr(config, CONFIG_KEY, {"format": 1, "kept_ids": kept.tolist(), "id_map": id_map.tolist()})
    device = emb.weight.device
    student_model.register_buffer("kdforge_vocab_map", kept.clone().to(device), persistent=False)
    student_model.register_buffer("kdforge_id_map", id_map.clone().to(device), persistent=False)
    return student_model, new_tokenizer


# -- internals --------------------------------------------------------------------------------------------------


def _as_counts(freqs, size: int) -> list[int]:
    counts = [0] * size
    items = freqs.items() if isinstance(freqs, Mapping) else enumerate(
        freqs.tolist() if isinstance(freqs, torch.Tensor) else list(freqs))
    for key, value in items:
        i, c = int(key), int(value)
        if c < 0:
            raise KDForgeError(f"token frequencies must be counts (>= 0), got {c} for id {i}")
        if c and not 0 <= i < size:
            raise KDForgeError(f"token frequencies name id {i} but the tokenizer has {size} ids; count with the "
                               "same tokenizer (token_frequencies)")
        if 0 <= i < size:
            counts[i] = c
    return counts


def _as_ids(ids, size: int, what: str) -> torch.Tensor:
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1).cpu()
    if ids.numel() == 0:
        raise KDForgeError(f"{what} is empty; keep at least one token")
    if int(ids.min()) < 0 or int(ids.max()) >= size:
        raise KDForgeError(f"{what} must lie in [0, {size}), got ids from {int(ids.min())} to {int(ids.max())}")
    if torch.unique(ids).numel() != ids.numel():
        raise KDForgeError(f"{what} lists an id twice; each kept token has one row")
    return ids


def _special_ids(tokenizer, size: int) -> set[int]:
    ids = {int(i) for i in getattr(tokenizer, "all_special_ids", []) if i is not None}
    ids |= {int(i) for i in getattr(tokenizer, "added_tokens_decoder", {})}
    return {i for i in ids if 0 <= i < size}


def _backend_state(tokenizer) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise KDForgeError(f"{type(tokenizer).__name__} is not a fast (`tokenizers`-backed) tokenizer; vocabulary "
                           "compression rewrites tokenizer.json: load it with AutoTokenizer (use_fast=True)")
    return json.loads(backend.to_str())


def _merges(model: dict[str, Any]) -> list[tuple[str, str]]:
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else (m[0], m[1]) for m in model.get("merges", [])]


def _bpe_merge_part_ids(tokenizer) -> set[int]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return set()
    model = json.loads(backend.to_str())["model"]
    if model.get("type") != "BPE":
        return set()
    vocab = model["vocab"]
    return {int(vocab[p]) for pair in _merges(model) for p in pair if p in vocab}


def _remapped_tokenizer_state(tokenizer, mapping: torch.Tensor, id_map: torch.Tensor) -> dict[str, Any]:
    state = _backend_state(tokenizer)
    model = state["model"]
    kind = model.get("type")
    if kind not in ("BPE", "WordPiece", "WordLevel"):
        raise KDForgeError(f"cannot compress a {kind or 'untyped'} tokenizer model: several strings must share an id, "
                           "which BPE, WordPiece and WordLevel vocabularies allow and Unigram does not")
    vocab: dict[str, int] = model["vocab"]
    n = id_map.numel()
    if any(i >= n for i in vocab.values()):
        raise KDForgeError(f"the tokenizer has ids up to {max(vocab.values())} but the mapping covers {n}")
    if kind == "BPE":
        _check_bpe(model, mapping)
    new = {token: int(id_map[i]) for token, i in vocab.items()}
    for added in state.get("added_tokens", []):
        old = int(added["id"])
        if old >= n:
            raise KDForgeError(f"added token {added['content']!r} has id {old}, outside the mapping's {n} ids")
        added["id"] = int(id_map[old])
        new.setdefault(added["content"], added["id"])  # so `tokenizers` gives it this id on load
    model["vocab"] = new
    _remap_processor(state.get("post_processor"), id_map)
    if state.get("padding") and state["padding"].get("pad_id") is not None:
        state["padding"]["pad_id"] = int(id_map[int(state["padding"]["pad_id"])])
    return state


def _check_bpe(model: dict[str, Any], mapping: torch.Tensor) -> None:
    vocab: dict[str, int] = model["vocab"]
    token_of = {i: t for t, i in vocab.items()}
    parts = {p for pair in _merges(model) for p in pair}
    bad = []
    for token, i in vocab.items():
        target = int(mapping[i])
        if target == i:
            continue
        if token in parts:
            bad.append(f"dropped {token!r} is a merge part")
        elif token_of.get(target) in parts:
            bad.append(f"{token!r} -> {token_of.get(target)!r}, a merge part")
        if len(bad) == 3:
            break
    if bad:
        raise KDForgeError(f"a BPE tokenizer looks merges up by id, so a token that merges build on cannot share an "
                           f"id ({'; '.join(bad)}); keep merge parts with choose_kept_ids(..., "
                           "keep_bpe_merge_parts=True) and map with nearest_kept(..., "
                           "targets=mapping_targets(tokenizer, kept))")


def _remap_processor(processor: dict[str, Any] | None, id_map: torch.Tensor) -> None:
    if not processor:
        return
    kind = processor.get("type")
    if kind == "TemplateProcessing":
        for spec in processor.get("special_tokens", {}).values():
            spec["ids"] = [int(id_map[int(i)]) for i in spec["ids"]]
    elif kind in ("BertProcessing", "RobertaProcessing"):
        for key in ("sep", "cls"):
            token, i = processor[key]
            processor[key] = [token, int(id_map[int(i)])]
    elif kind == "Sequence":
        for inner in processor.get("processors", []):
            _remap_processor(inner, id_map)


def _load_tokenizer(tokenizer, tokenizer_json: str):
    """The tokenizer a user gets from the exported folder: the original's files, tokenizer.json replaced."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        _write_tokenizer_json(folder, tokenizer_json)
        new_tokenizer = AutoTokenizer.from_pretrained(folder)
    new_tokenizer.kdforge_tokenizer_json = tokenizer_json
    new_tokenizer.save_pretrained = types.MethodType(_save_faithfully, new_tokenizer)
    return new_tokenizer


def _save_faithfully(self, save_directory, *args, **kwargs):
    """``save_pretrained``, then the many-to-one tokenizer.json (the backend would keep one string per id)."""
    files = type(self).save_pretrained(self, save_directory, *args, **kwargs)
    _write_tokenizer_json(str(save_directory), self.kdforge_tokenizer_json)
    return files


def _write_tokenizer_json(folder: str, tokenizer_json: str) -> None:
    for name in _SLOW_VOCAB_FILES:  # one id per line / entry: they cannot hold shared ids
        path = os.path.join(folder, name)
        if os.path.exists(path):
            os.remove(path)
    with open(os.path.join(folder, "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(tokenizer_json)


def _shrink_model(model: nn.Module, kept: torch.Tensor, id_map: torch.Tensor) -> None:
    emb = model.get_input_embeddings()
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    old_rows = emb.weight.shape[0]
    replace: dict[int, nn.Parameter] = {}

    def keep_rows(param: torch.Tensor) -> nn.Parameter:
        rows = kept.to(param.device)
        return nn.Parameter(param.detach().index_select(0, rows).clone(), requires_grad=param.requires_grad)

    replace[id(emb.weight)] = keep_rows(emb.weight)
    out_weight = getattr(out, "weight", None)
    if isinstance(out_weight, nn.Parameter) and id(out_weight) not in replace:  # untied output layer
        if out_weight.shape[0] != old_rows:
            raise KDForgeError(f"the output layer has {out_weight.shape[0]} rows and the input embedding {old_rows}; "
                               "cannot compress a model whose vocabularies differ")
        replace[id(out_weight)] = keep_rows(out_weight)
    out_bias = getattr(out, "bias", None)
    if isinstance(out_bias, nn.Parameter) and out_bias.shape[0] == old_rows:
        replace[id(out_bias)] = keep_rows(out_bias)
    for module in model.modules():  # every reference, so tied copies stay tied
        for name, param in list(module._parameters.items()):
            if param is not None and id(param) in replace:
                module._parameters[name] = replace[id(param)]
    new_rows = kept.numel()
    emb.num_embeddings = new_rows
    if getattr(emb, "padding_idx", None) is not None:
        emb.padding_idx = _new_id(emb.padding_idx, id_map)
    if out is not None and hasattr(out, "out_features"):
        out.out_features = new_rows
    for module in model.modules():
        if type(getattr(module, "vocab_size", None)) is int and module.vocab_size == old_rows:
            module.vocab_size = new_rows
    config = getattr(model, "config", None)
    if config is not None:
        config.vocab_size = new_rows
    for cfg in (config, getattr(model, "generation_config", None)):
        if cfg is None:
            continue
        for field in _ID_FIELDS:
            value = getattr(cfg, field, None)
            if isinstance(value, int) and not isinstance(value, bool):
                setattr(cfg, field, _new_id(value, id_map))
            elif isinstance(value, list | tuple) and value and all(isinstance(v, int) for v in value):
                setattr(cfg, field, [i for i in (_new_id(v, id_map) for v in value) if i is not None])


def _new_id(old: int, id_map: torch.Tensor) -> int | None:
    return int(id_map[old]) if 0 <= old < id_map.numel() else None
