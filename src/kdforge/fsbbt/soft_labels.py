"""Teacher soft labels for FS-BBT student training (Nguyen, Gupta, Do & Venkatesh, ECCV 2022).

The black-box teacher returns only class probabilities ``p_T(x)`` for each pool image (few-shot images,
MixUp images and CVAE images); the student is trained with the soft cross-entropy (the authors' code,
``cifar10/fsbbt_alexnet.py``, compiles the student with ``categorical_crossentropy`` on the teacher
predictions ``y_kl``, ``--loss ce --balance 0``)::

    L = -1/B * sum_i sum_k p_T(x_i)_k * log softmax(s(x_i))_k

:class:`SoftLabelDataset` serves the pool the way kdforge's image tasks do
(:class:`kdforge.tasks.vision.ImageArrayDataset`): ``{"image": uint8 (H, W, C), "label": int}`` plus
``"soft_labels": float32 (K,)``, where ``label`` is the teacher's argmax. :class:`SoftLabelCollator` is
:class:`kdforge.tasks.vision.ImageCollator` (normalised ``pixel_values`` ``(B, C, H, W)``, optional random
crop and flip, which act on the image only, as the authors' Keras ``ImageDataGenerator``) plus the stacked
``soft_labels``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from kdforge.errors import KDForgeError
from kdforge.tasks.vision import ImageCollator


def to_uint8_hwc(images: torch.Tensor) -> torch.Tensor:
    """``uint8 (N, H, W, C)`` as is; float ``(N, C, H, W)`` in [0, 1] -> ``round(255 * x)``, ``uint8 (N, H, W, C)``."""
    if images.ndim != 4:
        raise KDForgeError(f"FS-BBT images must be uint8 (N, H, W, C) or float (N, C, H, W), got shape "
                           f"{tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images.contiguous()
    if not images.is_floating_point():
        raise KDForgeError(f"FS-BBT images must be uint8 or float in [0, 1], got {images.dtype}")
    if len(images) and (images.min() < 0 or images.max() > 1):
        raise KDForgeError(f"float FS-BBT images must lie in [0, 1], got [{float(images.min()):.3g}, "
                           f"{float(images.max()):.3g}]; scale them with x / 255")
    return torch.round(images.detach().cpu() * 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


class SoftLabelDataset(Dataset):
    """Images with teacher probabilities: items ``{"image": uint8 (H, W, C), "label": argmax, "soft_labels": (K,)}``.

    ``images``: ``uint8 (N, H, W, C)`` (kdforge's layout) or float ``(N, C, H, W)`` in [0, 1] (MixUp and CVAE
    output), stored as ``uint8``; query the teacher on the same quantised images (``x.float() / 255``) if the
    probabilities must match the stored pixels exactly. ``probs``: ``(N, K)``, rows >= 0 summing to 1."""

    def __init__(self, images: torch.Tensor, probs: torch.Tensor):
        self.images = to_uint8_hwc(images)
        probs = torch.as_tensor(probs).detach().cpu().float()
        if probs.ndim != 2 or len(probs) != len(self.images):
            raise KDForgeError(f"SoftLabelDataset needs probs (N, K) for N = {len(self.images)} images, got "
                               f"{tuple(probs.shape)}")
        if len(probs) and (probs.min() < 0 or not torch.allclose(probs.sum(1), torch.ones(len(probs)), atol=1e-3)):
            raise KDForgeError("SoftLabelDataset probs must be probabilities (>= 0, rows summing to 1); "
                               "apply softmax to the teacher's logits first")
        self.probs = probs
        self.labels = probs.argmax(1) if len(probs) else torch.empty(0, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": self.images[i], "label": int(self.labels[i]), "soft_labels": self.probs[i]}


@dataclass(frozen=True)
class SoftLabelCollator(ImageCollator):
    """:class:`ImageCollator` batches ``{"pixel_values", "labels"}`` plus ``"soft_labels"`` ``(B, K)``."""

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = super().__call__(examples)
        batch["soft_labels"] = torch.stack([example["soft_labels"] for example in examples])
        return batch


def soft_cross_entropy(logits: torch.Tensor, soft_targets: torch.Tensor) -> torch.Tensor:
    """``-(soft_targets * log_softmax(logits)).sum(-1).mean()``; gradient ``(softmax(logits) - targets) / B``."""
    if logits.shape != soft_targets.shape:
        raise KDForgeError(f"soft_cross_entropy needs logits and soft targets of one shape, got "
                           f"{tuple(logits.shape)} and {tuple(soft_targets.shape)}")
    return -(soft_targets * F.log_softmax(logits, dim=-1)).sum(-1).mean()
