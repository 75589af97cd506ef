"""MixUp for FS-BBT (Nguyen, Gupta, Do & Venkatesh, "Black-box Few-shot Knowledge Distillation", ECCV 2022).

Two uses:

* :func:`mixup_pool` builds the synthetic *image pool* from the few unlabeled images (Sec. 3.2 of the
  paper): the set is replicated ``copies`` times, two independent random orderings of the replicated set
  form the pairs, and each pair is mixed ``x = lam * x_a + (1 - lam) * x_b`` with
  ``lam ~ Beta(1, 1)`` rounded to 2 decimals. A pair whose ``lam <= 0.05`` or ``lam >= 0.95`` is nearly
  one of the originals and is dropped; the caller replaces each dropped pair by one CVAE sample
  (:func:`kdforge.fsbbt.cvae.generate`), so the pool keeps ``copies * N`` images.
* :func:`batch_mixup` is the ordinary mixup of Zhang et al. (ICLR 2018) applied to each student batch.

Defaults taken from the authors' code (nphdang/FS-BBT, ``cifar10/3_student_fsbbt.bat`` and the
``mix_up`` function of ``cifar10/fsbbt_alexnet.py``): ``--mxalpha 1`` (Beta(1, 1)), ``--round 2`` (lambda
rounded to 2 decimals), ``--threshold 0.05`` (drop ``lam <= 0.05`` or ``lam >= 1 - 0.05``);
``--nomixup 40000`` images for 2,000 CIFAR-10 images, i.e. ``copies = 20`` (24000 / 2000 = 12 for MNIST).
Pairs drawn from the same source image are kept, as in that code (their mix is the image itself).

The student-side mixup (``fashion/mixup_generator.py``, used with ``--augmentation combination``) draws
**one lambda per sample**, ``lam_i ~ Beta(alpha, alpha)`` (not one per batch), unrounded and never
thresholded; :func:`batch_mixup` does the same. The authors mix the first half of a 2B-sample draw with
the second half; here a sample is mixed with a random permutation of its own batch (Zhang et al.'s
usual form), which gives the same pair distribution without needing twice the batch.

Random numbers come only from the ``torch.Generator`` passed in (Beta draws use a NumPy generator
seeded from it), so a seeded generator makes the pool reproducible.
"""

from __future__ import annotations

import numpy as np
import torch

from kdforge.errors import KDForgeError


def beta_sample(alpha: float, size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``size`` draws of ``Beta(alpha, alpha)`` as ``float64``, reproducible from ``generator``.

    torch's Beta sampler takes no generator, so a NumPy generator is seeded from one draw of it."""
    if not alpha > 0:
        raise KDForgeError(f"mixup alpha must be > 0, got {alpha}; set the mixup alpha to e.g. 1.0")
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return torch.from_numpy(np.random.default_rng(seed).beta(alpha, alpha, size))


def _check_images(images: torch.Tensor, what: str) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or not images.is_floating_point():
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise KDForgeError(f"{what} must be a float tensor (N, C, H, W) with values in [0, 1], got {shape}; "
                           "convert uint8 images with x.float() / 255")
    if len(images) == 0:
        raise KDForgeError(f"{what} is empty; give at least one image")


def mixup_pool(images: torch.Tensor, copies: int, generator: torch.Generator, low: float = 0.05,
               high: float = 0.95, *, alpha: float = 1.0, decimals: int = 2) -> tuple[torch.Tensor, int]:
    """The FS-BBT MixUp pool of ``copies * N`` pairs of ``images``, minus the near-original pairs.

    ``images``: ``(N, C, H, W)`` floats in [0, 1]. With ``M = copies * N`` and the replicated set
    ``R = [images; images; ...]``, two independent permutations ``p, q`` of ``range(M)`` are drawn
    (in that order, then the lambdas), and for each ``i``::

        lam_i = round(Beta(alpha, alpha), decimals)
        x_i   = lam_i * R[p_i] + (1 - lam_i) * R[q_i]

    Pairs with ``lam_i <= low`` or ``lam_i >= high`` are dropped. Returns ``(kept mixed images, number
    dropped)``; ``len(kept) + dropped == copies * N``. With the paper's Beta(1, 1) and 2 decimals, a pair
    is dropped with probability 0.055 + 0.055 = 0.11 (``lam`` rounds to <= 0.05 when the draw is below
    0.055, to >= 0.95 when it is at least 0.945).
    """
    _check_images(images, "mixup_pool images")
    if isinstance(copies, bool) or not isinstance(copies, int) or copies < 1:
        raise KDForgeError(f"mixup copies must be an integer >= 1, got {copies!r}; set the number of "
                           "MixUp copies of the few-shot set (the paper uses 20 for 2,000 CIFAR-10 images)")
    if not low < high:
        raise KDForgeError(f"mixup thresholds need low < high, got low={low}, high={high}; "
                           "the paper uses low=0.05, high=0.95")
    total = copies * len(images)
    replicated = images.repeat(copies, 1, 1, 1)
    first = torch.randperm(total, generator=generator)
    second = torch.randperm(total, generator=generator)
    lam = torch.round(beta_sample(alpha, total, generator), decimals=decimals)
    keep = (lam > low) & (lam < high)
    lam_x = lam[keep].to(images.dtype).view(-1, 1, 1, 1)
    mixed = lam_x * replicated[first[keep]] + (1 - lam_x) * replicated[second[keep]]
    return mixed, int((~keep).sum())


def batch_mixup(inputs: torch.Tensor, soft_targets: torch.Tensor, alpha: float = 1.0,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup (Zhang et al., 2018) of a batch with a random permutation of itself, one lambda per sample.

    ``lam_i ~ Beta(alpha, alpha)``, ``perm`` a random permutation of the batch::

        x'_i = lam_i * x_i + (1 - lam_i) * x_perm(i)
        y'_i = lam_i * y_i + (1 - lam_i) * y_perm(i)

    ``inputs``: ``(B, ...)``; ``soft_targets``: ``(B, K)`` (teacher probabilities). The paper's code uses
    ``alpha = 1`` (``--mxalpha 1``) and per-sample lambdas (``fashion/mixup_generator.py``). Random numbers
    come from ``generator`` (the global torch RNG when ``None``).
    """
    if inputs.ndim < 1 or soft_targets.ndim != 2 or len(inputs) != len(soft_targets):
        raise KDForgeError(f"batch_mixup needs inputs (B, ...) and soft targets (B, K) with the same B, got "
                           f"{tuple(inputs.shape)} and {tuple(soft_targets.shape)}")
    size = len(inputs)
    perm = torch.randperm(size, generator=generator, device="cpu").to(inputs.device)
    lam = beta_sample(alpha, size, generator)
    lam_x = lam.to(device=inputs.device, dtype=inputs.dtype).view(-1, *([1] * (inputs.ndim - 1)))
    lam_y = lam.to(device=soft_targets.device, dtype=soft_targets.dtype).view(-1, 1)
    mixed_inputs = lam_x * inputs + (1 - lam_x) * inputs[perm]
    mixed_targets = lam_y * soft_targets + (1 - lam_y) * soft_targets[perm.to(soft_targets.device)]
    return mixed_inputs, mixed_targets
