"""Choose hint layers by clustering the teacher's layers on their representational similarity.

Layers whose representations are alike carry the same knowledge, so one hint per group of alike
layers suffices. The similarity is linear CKA (Kornblith, Norouzi, Lee & Hinton, ICML 2019,
"Similarity of Neural Network Representations Revisited", eq. 5 / linear kernel):

    CKA(X, Y) = ||Y^T X||_F^2 / ( ||X^T X||_F ||Y^T Y||_F )

on column-centred features X (n x d1), Y (n x d2) of the same n examples: one row per example,
the layer's hidden states mean-pooled over the non-padding tokens (or the [CLS] vector). It is
computed through the n x n Gram matrices (||Y^T X||_F^2 = <X X^T, Y Y^T>_F), in float64.

The layers are then clustered into k groups by average-linkage agglomerative clustering on the
distance 1 - CKA (scikit-learn, precomputed distances; deterministic), and each group contributes
its medoid: the member with the smallest summed distance to the other members (ties: the lower
index). The hint points are returned sorted.

    layer_similarity(hidden_states, mask=None) -> (L, L) array
    select_hint_points(similarity, k) -> [layer indices]
    hint_points_for(model, batches, k) -> [hidden-state indices of the model's layers]
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import closing
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from kdforge.engine.predict import iterate_outputs
from kdforge.errors import KDForgeError
from kdforge.models.adapter import ModelAdapter


def pool_features(hidden: torch.Tensor, mask: torch.Tensor | None = None,
                  pooling: Literal["mean", "cls"] = "mean") -> torch.Tensor:
    """(n, d) features of one layer: (N, L, d) token states mean-pooled over the tokens where
    ``mask`` is 1 (or position 0 for ``cls``); (N, C, H, W) maps averaged over space; (N, d) kept."""
    hidden = hidden.detach().double()
    if hidden.dim() == 2:
        return hidden
    if hidden.dim() == 4:
        return hidden.mean(dim=(2, 3))
    if hidden.dim() != 3:
        raise KDForgeError(f"cannot pool features of shape {tuple(hidden.shape)}; expected (N, d), (N, L, d) "
                           "or (N, C, H, W)")
    if pooling == "cls":
        return hidden[:, 0]
    if mask is None:
        return hidden.mean(dim=1)
    weights = mask.to(hidden.device).double().unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def _centred_gram(x: torch.Tensor) -> torch.Tensor:
    x = x - x.mean(dim=0, keepdim=True)
    return x @ x.T


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two (n, d) feature matrices of the same n examples (centred here)."""
    return float(_cka_from_grams(_centred_gram(x.double()), _centred_gram(y.double())))


def _cka_from_grams(gx: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
    denominator = torch.linalg.norm(gx) * torch.linalg.norm(gy)
    if denominator <= 0:
        return torch.zeros((), dtype=gx.dtype)  # a constant layer: no similarity to anything
    return (gx * gy).sum() / denominator


def layer_similarity(hidden_states: Sequence[torch.Tensor], mask: torch.Tensor | None = None,
                     pooling: Literal["mean", "cls"] = "mean") -> np.ndarray:
    """(L, L) linear-CKA matrix between the layers' pooled features (diagonal 1)."""
    if len(hidden_states) == 0:
        raise KDForgeError("layer_similarity needs at least one layer's hidden states")
    features = [pool_features(h, mask, pooling) for h in hidden_states]
    n = features[0].shape[0]
    if n < 2 or any(f.shape[0] != n for f in features):
        raise KDForgeError(f"layer_similarity needs the same >= 2 examples for every layer, got "
                           f"{[f.shape[0] for f in features]}")
    grams = [_centred_gram(f) for f in features]
    size = len(grams)
    similarity = np.eye(size)
    for i in range(size):
        for j in range(i + 1, size):
            similarity[i, j] = similarity[j, i] = float(_cka_from_grams(grams[i], grams[j]))
    return similarity


def select_hint_points(similarity: np.ndarray, k: int) -> list[int]:
    """Cluster the layers into ``k`` groups on 1 - similarity and return each group's medoid, sorted."""
    similarity = np.asarray(similarity, dtype=float)
    if similarity.ndim != 2 or similarity.shape[0] != similarity.shape[1]:
        raise KDForgeError(f"select_hint_points needs a square similarity matrix, got shape {similarity.shape}")
    size = similarity.shape[0]
    if not 1 <= k <= size:
        raise KDForgeError(f"cannot pick {k} hint points from {size} layers; choose k between 1 and {size}")
    distance = 1.0 - (similarity + similarity.T) / 2.0
    np.fill_diagonal(distance, 0.0)
    distance = np.clip(distance, 0.0, None)
    if k == size:
        return list(range(size))
    if k == 1:
        labels = np.zeros(size, dtype=int)
    else:
        from sklearn.cluster import AgglomerativeClustering

        labels = AgglomerativeClustering(n_clusters=k, metric="precomputed", linkage="average").fit_predict(distance)
    points = []
    for cluster in np.unique(labels):
        members = np.flatnonzero(labels == cluster)
        cost = distance[np.ix_(members, members)].sum(axis=1)
        points.append(int(members[np.argmin(cost)]))  # argmin takes the first (lowest index) on ties
    return sorted(points)


def _one_batch(items: list[dict[str, Any]]) -> dict[str, Any]:
    """``collate_fn`` for a list of ready batches served one at a time: the batch itself."""
    return items[0]


def hint_points_for(model: nn.Module, batches: Iterable[dict[str, Any]], k: int,
                    pooling: Literal["mean", "cls"] = "mean", include_embeddings: bool = False) -> list[int]:
    """Run ``model`` (eval mode, no grad) over a few batches and pick ``k`` hint layers.

    Returns hidden-state indices (i = output of layer i, 1..num_layers; 0 = the embedding output,
    a candidate only with ``include_embeddings``), usable as ``teacher_layer`` of the ``hint`` term.
    """
    adapter = ModelAdapter(model, hidden_states=True)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    per_layer: list[list[torch.Tensor]] | None = None
    # closing(): the model's mode is restored at once, also when the loop below raises
    with closing(iterate_outputs(adapter, list(batches), _one_batch, 1, device, "hint points")) as outputs_of:
        for outputs, batch in outputs_of:
            if outputs.hidden_states is None:
                raise KDForgeError(f"hint_points_for needs hidden states but {type(model).__name__} returns none; "
                                   "use a Hugging Face model")
            states = outputs.hidden_states if include_embeddings else outputs.hidden_states[1:]
            pooled = [pool_features(h, batch.get("attention_mask"), pooling).cpu() for h in states]
            if per_layer is None:
                per_layer = [[p] for p in pooled]
            else:
                for bucket, p in zip(per_layer, pooled, strict=True):
                    bucket.append(p)
    if per_layer is None:
        raise KDForgeError("hint_points_for got no batches; pass a few batches of the training data")
    similarity = layer_similarity([torch.cat(bucket) for bucket in per_layer])
    offset = 0 if include_embeddings else 1
    return [i + offset for i in select_hint_points(similarity, k)]
