"""Teacher-output cache: offline KD computes the frozen teacher's outputs once, not every epoch.

The teacher's logits (and, if asked, selected hidden states) on every training example are
computed in one pass and stored on disk under a key made of: a hash of the teacher's weights,
the task fingerprint (data files, columns, limits, ``max_length``), the split size, the
tokenizer's vocabulary, and the storage settings. Changing any of them gives a new key, so a
stale cache is never reused (torchdistill keyed by sample index alone and silently reused stale
outputs). kdforge uses the cache only where it is exact: one frozen teacher, no attention maps or
hooked features, and training inputs without random augmentation.

Storage options (``teacher_cache`` in the config):
* ``dtype: float16`` halves the size; logits then differ from the teacher's by fp16 rounding.
* ``top_k: K`` keeps the K largest logits of each row plus the remaining probability mass; the
  other classes are filled with equal shares of that mass, so at the temperature of the stage's
  KD loss the reconstructed distribution has the teacher's top-K probabilities exactly (for large
  vocabularies).
* ``hidden_states: [i, ...]`` also keeps those hidden states (0 = embedding output) token by
  token (padding dropped); a batch gets them back padded to its own length.

Per-token logits (a language model's (batch, length, vocabulary) outputs, for ``word_kd``) are
stored token by token too, padding dropped (a 49k-word vocabulary in float16 is 98 KB per token;
a dense cache estimated above 16 GB is refused), or with ``top_k``, sparsified batch by batch so
the dense logits of the whole split never exist at once. Top-k is accurate for losses at T = 1
and not at GLMD's T = 15, where the many tail words carry most of the mass and their shape
matters (measured: benchmarks/results/glmd.md).

Files: ``<key>-<tag>.pt`` (tensors and plain values, read with ``weights_only=True``), beside it
``<key>-<tag>.pt.json`` (its size and SHA-256: a truncated or corrupted file is reported and
rebuilt) and ``<key>-<tag>.pt.lock``. Several runs may share one cache folder: an entry is written
to a uniquely named temporary file and renamed into place, and the builder holds the lock, so two
runs that need the same entry at once build it once (the other waits, then reuses it).
"""

from __future__ import annotations

import hashlib
import logging
import math
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from kdforge.engine.checkpoint import save_torch_atomic, short_reason
from kdforge.engine.predict import iterate_outputs
from kdforge.errors import KDForgeError
from kdforge.io import check_file, file_lock, read_json
from kdforge.models.adapter import ModelAdapter
from kdforge.models.outputs import Outputs
from kdforge.paths import cache_dir

log = logging.getLogger("kdforge")


@dataclass(frozen=True)
class CacheSpec:
    """What is stored and how."""

    dtype: torch.dtype = torch.float32
    top_k: int | None = None
    hidden_states: tuple[int, ...] = ()
    temperature: float = 1.0  # at which the top-k tail keeps its mass (see sparsify)

    def tag(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        tail = f"T{self.temperature:g}" if self.top_k and self.temperature != 1.0 else ""
        return f"{dtype}-k{self.top_k or 'all'}{tail}-h{'.'.join(map(str, self.hidden_states)) or 'none'}"


def model_fingerprint(model: torch.nn.Module) -> str:
    """Hash of every parameter and buffer (names, shapes and values)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def cache_key(model: torch.nn.Module, data_fingerprint: str, n_examples: int, tokenizer=None,
              spec: CacheSpec = CacheSpec()) -> str:
    vocab = ""
    if tokenizer is not None:
        vocab = hashlib.sha256(str(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()[:16]
    blob = f"{model_fingerprint(model)}|{data_fingerprint}|{n_examples}|{vocab}|{spec.tag()}"
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def sparsify(logits: torch.Tensor, k: int, temperature: float = 1.0) -> dict[str, torch.Tensor]:
    """Top-k logits per row, and the logit ``fill`` that gives each of the other C - k classes an
    equal share of their probability mass at temperature T, so the reconstructed softmax(z / T)
    has the teacher's top-k probabilities exactly:

        (C - k) exp(fill / T) = sum_{i not in top-k} exp(z_i / T)
        fill = T * (logsumexp_{i not in top-k}(z_i / T) - log(C - k))

    T should be the temperature of the loss that reads the cache (a tail matched at T = 1 is far
    off at T = 15, where the many small logits carry most of the mass)."""
    values, indices = logits.topk(k, dim=-1)
    rest = (logits / temperature).scatter(-1, indices, float("-inf")).logsumexp(-1)
    return {"values": values, "indices": indices,
            "fill": temperature * (rest - math.log(max(1, logits.shape[-1] - k)))}


def densify(values: torch.Tensor, indices: torch.Tensor, fill: torch.Tensor, num_classes: int) -> torch.Tensor:
    dense = fill[:, None].expand(len(fill), num_classes).clone()
    return dense.scatter_(1, indices, values)


#: the largest dense per-token cache kdforge builds (estimated from the first batch); above it, set top_k
DENSE_TOKEN_CACHE_MAX_BYTES = 16 * 2**30


class TeacherCache:
    """Teacher outputs of a training split, looked up by the batch's ``index``."""

    def __init__(self, store: dict, key: str):
        self.store = store
        self.key = key

    def token_logits(self, index: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(N, L, V) logits of the examples ``index`` at the real positions of ``mask`` (N, L); 0 elsewhere."""
        tokens = self.store["tokens"]
        offsets, num_classes = tokens["offsets"], self.store["num_classes"]
        out = torch.zeros((*mask.shape, num_classes))
        for row, i in enumerate(index.tolist()):
            start, end = int(offsets[i]), int(offsets[i + 1])
            if "logits" in tokens:
                values = tokens["logits"][start:end].float()
            else:
                values = densify(tokens["values"][start:end].float(), tokens["indices"][start:end].long(),
                                 tokens["fill"][start:end].float(), num_classes)
            out[row][mask[row].bool()] = values
        return out

    def logits(self, index: torch.Tensor) -> torch.Tensor:
        s = self.store
        if "logits" in s:
            return s["logits"][index].float()
        sparse = s["topk"]
        return densify(sparse["values"][index].float(), sparse["indices"][index].long(),
                       sparse["fill"][index].float(), s["num_classes"])

    def hidden_states(self, index: torch.Tensor, length: int) -> tuple[torch.Tensor | None, ...] | None:
        s = self.store
        if not s["hidden"]:
            return None
        states: list[torch.Tensor | None] = [None] * s["num_hidden_states"]
        for layer, entry in s["hidden"].items():
            offsets, values = entry["offsets"], entry["values"]
            out = values.new_zeros((len(index), length, values.shape[-1]), dtype=torch.float32)
            for row, i in enumerate(index.tolist()):
                start, end = int(offsets[i]), int(offsets[i + 1])
                out[row, : end - start] = values[start:end].float()
            states[layer] = out
        return tuple(states)

    def lookup(self, batch: dict) -> Outputs:
        index = batch["index"].cpu()
        device = batch["index"].device
        length = batch["attention_mask"].shape[1] if "attention_mask" in batch else 0
        hidden = self.hidden_states(index, length)
        logits = self.token_logits(index, batch["attention_mask"].cpu()) if "tokens" in self.store \
            else self.logits(index)
        return Outputs(logits=logits.to(device),
                       hidden_states=None if hidden is None else tuple(
                           None if h is None else h.to(device) for h in hidden))

    @classmethod
    def load_or_build(cls, teacher: torch.nn.Module, data: Dataset, collate_fn, data_fingerprint: str,
                      tokenizer=None, batch_size: int = 64, device="cpu", spec: CacheSpec = CacheSpec(),
                      folder: Path | None = None, build: bool = True) -> TeacherCache | None:
        key = cache_key(teacher, data_fingerprint, len(data), tokenizer, spec)
        path = Path(folder or cache_dir() / "teacher-outputs") / f"{key}-{spec.tag()}.pt"
        store, problem = read_entry(path)
        if store is None and build:
            with file_lock(path.with_name(path.name + ".lock")):  # one builder per entry across processes
                store, problem = read_entry(path)  # another run may have built it while this one waited
                if store is None:
                    if problem:
                        log.warning("teacher outputs: cache file %s is %s; rebuilding it", path, problem)
                    log.info("teacher outputs: computing them once for %d training examples (cache %s)",
                             len(data), path)
                    store = compute_outputs(teacher, data, collate_fn, batch_size, device, spec)
                    write_entry(store, path)
                    return cls(store, key)
        if store is None:
            if problem:
                log.warning("teacher outputs: cache file %s is %s; not used", path, problem)
            return None
        log.info("teacher outputs: reusing cache %s", path)
        return cls(store, key)


def read_entry(path: Path) -> tuple[dict | None, str | None]:
    """``(store, None)`` for a valid cache file, ``(None, None)`` when there is none, and
    ``(None, what is wrong)`` for a truncated, corrupt or unreadable one (checked against the size and
    SHA-256 recorded beside it, then loaded with ``weights_only=True``)."""
    if not path.is_file():
        return None, None
    record_path = path.with_name(path.name + ".json")
    if record_path.is_file():
        try:
            problem = check_file(path, read_json(record_path, ""))
        except KDForgeError:
            problem = f"unverifiable ({record_path.name} is truncated or not valid JSON)"
        if problem:
            return None, problem
    try:
        return torch.load(path, map_location="cpu", weights_only=True), None
    except Exception as err:  # truncated archives and refused pickles alike: the entry is rebuilt
        return None, f"unreadable ({short_reason(err)})"


def write_entry(store: dict, path: Path) -> None:
    """Save ``store`` atomically (unique temporary name, then a rename), its size and SHA-256 just
    before the rename: a reader sees either no file, or a whole file and the record that checks it."""
    save_torch_atomic(store, path, record=path.with_name(path.name + ".json"))


@torch.inference_mode()
def compute_outputs(teacher: torch.nn.Module, data: Dataset, collate_fn, batch_size: int, device,
                    spec: CacheSpec) -> dict:
    """One pass of the teacher (eval mode) over ``data`` in order; returns the store to save."""
    adapter = ModelAdapter(teacher, hidden_states=bool(spec.hidden_states))
    logits, hidden = [], {layer: [] for layer in spec.hidden_states}
    lengths: list[torch.Tensor] = []
    n_states = 0
    # closing(): an error mid-way (the size guard) restores the teacher's mode at once
    with closing(iterate_outputs(adapter, data, collate_fn, batch_size, device, "teacher outputs")) as outputs:
        for out, batch in outputs:
            mask = batch.get("attention_mask")
            n_tokens = mask.sum(-1).cpu() if mask is not None else None
            if out.logits.dim() == 3:  # per-token logits: keep the real positions only
                logits.append(_token_rows(out.logits.float(), mask, spec))
                if len(logits) == 1:
                    _check_dense_size(logits[0], len(out.logits), len(data))
            else:
                logits.append(out.logits.float().cpu())
            if spec.hidden_states or out.logits.dim() == 3:
                if n_tokens is None:
                    n_tokens = torch.full((len(out.logits),), out.logits.shape[1] if out.logits.dim() == 3
                                          else out.hidden_states[0].shape[1])
                lengths.append(n_tokens)
            if spec.hidden_states:
                n_states = len(out.hidden_states)
                for layer in spec.hidden_states:
                    h = out.hidden_states[layer].cpu()
                    hidden[layer] += [h[b, : int(n)].to(spec.dtype) for b, n in enumerate(n_tokens)]
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.cat(lengths).cumsum(0)]) if lengths else None
    store: dict = {"num_hidden_states": n_states, "hidden": {}}
    if logits and isinstance(logits[0], dict):  # per-token
        store["num_classes"] = logits[0]["num_classes"]
        store["tokens"] = {key: torch.cat([part[key] for part in logits])
                           for key in logits[0] if key != "num_classes"}
        store["tokens"]["offsets"] = offsets
    else:
        all_logits = torch.cat(logits)
        store["num_classes"] = all_logits.shape[-1]
        if spec.top_k and spec.top_k < all_logits.shape[-1]:
            store["topk"] = {k: v.to(spec.dtype) if v.is_floating_point() else v
                             for k, v in sparsify(all_logits, spec.top_k, spec.temperature).items()}
        else:
            store["logits"] = all_logits.to(spec.dtype)
    for layer in spec.hidden_states:
        store["hidden"][layer] = {"offsets": offsets, "values": torch.cat(hidden[layer])}
    return store


def _token_rows(logits: torch.Tensor, mask: torch.Tensor | None, spec: CacheSpec) -> dict:
    """The (T, V) logits of a batch's real positions (in order), stored as ``spec`` says."""
    vocab = logits.shape[-1]
    rows = logits[mask.bool()] if mask is not None else logits.reshape(-1, vocab)
    if spec.top_k and spec.top_k < vocab:
        sparse = sparsify(rows, spec.top_k, spec.temperature)
        return {"num_classes": vocab, "values": sparse["values"].to(spec.dtype).cpu(),
                "indices": sparse["indices"].to(torch.int32).cpu(), "fill": sparse["fill"].to(spec.dtype).cpu()}
    return {"num_classes": vocab, "logits": rows.to(spec.dtype).cpu()}


def _check_dense_size(first: dict, batch_size: int, n_examples: int) -> None:
    """Refuse a dense per-token cache that would outgrow DENSE_TOKEN_CACHE_MAX_BYTES (estimated from
    the first batch) before spending a whole teacher pass on it."""
    if "logits" not in first:
        return
    rows = first["logits"]
    estimate = rows.numel() * rows.element_size() / batch_size * n_examples
    if estimate > DENSE_TOKEN_CACHE_MAX_BYTES:
        raise KDForgeError(f"caching the teacher's per-token logits over {first['num_classes']} words densely would "
                           f"take about {estimate / 2**30:.0f} GB; set teacher_cache.top_k (e.g. 64; accurate at "
                           "T = 1, not at high temperatures), fewer training passages, or "
                           "`teacher_cache.enabled: false`")


class IndexedDataset(Dataset):
    """Adds each example's position as ``index`` so cached teacher outputs can be looked up."""

    def __init__(self, data: Dataset):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        return {**self.data[i], "index": i}


class IndexedCollator:
    """Collates with ``collate_fn`` and adds the ``index`` tensor of the batch's examples."""

    def __init__(self, collate_fn):
        self.collate_fn = collate_fn

    def __call__(self, examples: list[dict]) -> dict:
        batch = self.collate_fn([{k: v for k, v in e.items() if k != "index"} for e in examples])
        batch["index"] = torch.tensor([e["index"] for e in examples])
        return batch
