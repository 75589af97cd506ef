"""The conditional VAE of FS-BBT (Nguyen, Gupta, Do & Venkatesh, "Black-box Few-shot Knowledge
Distillation", ECCV 2022), trained on the few unlabeled images with the teacher's argmax labels.

Model (Kingma & Welling, 2014; conditional form of Sohn et al., 2015), condition ``y`` = one-hot teacher
label::

    encoder  q(z | x, y) = N(mu(x, y), diag(exp(logvar(x, y))))
    z        = mu + exp(logvar / 2) * eps,  eps ~ N(0, I)
    decoder  p(x | z, y) = Bernoulli(sigmoid(f(z, y)))   (pixel values in [0, 1])

Loss (:func:`cvae_loss`), per image, averaged over the batch::

    L = sum_pixels BCE(x_hat, x) + KL,   KL = -1/2 * sum_j (1 + logvar_j - mu_j^2 - exp(logvar_j))

Conventions taken from the authors' code (nphdang/FS-BBT, ``cifar10/cvae.py`` and ``cifar10/2_cvae.bat``):

* the label enters the encoder as an **extra input channel** ("input_cond", the default ``--cvaemethod``):
  the one-hot label goes through a dense layer to ``H * W`` values reshaped to one ``H x W`` plane (a learned
  plane per class, not a constant plane holding the label id nor ``K`` one-hot planes) and is concatenated
  to the image channels; the decoder gets ``[z, one-hot]``;
* reconstruction term: binary cross-entropy **summed over all pixels** of an image; KL summed over the
  latent dimensions; both **averaged over the batch** (Keras averages the per-sample loss, and the KL layer
  adds ``mean(kl_batch)``);
* ``latent_dim = 2`` (``--latent 2``), Adam with Keras' default ``lr = 1e-3``, ``batch_size = 64`` and
  ``epochs = 600`` for CIFAR-10 (``2_cvae.bat``; MNIST/Fashion use 256 and 100/200);
* encoder convolutions ``kernel 4, stride 2, 'same' padding, ReLU`` then dense ``32 -> 16`` (ReLU) before the
  ``mu``/``logvar`` layers; decoder dense ``16 -> 32`` (ReLU) then a linear dense to the feature map,
  transposed convolutions ``kernel 4, stride 2, 'same'``, sigmoid output;
* "hybrid" latent sampling for generation (``--sampling hybrid`` in ``3_student_fsbbt.bat``): half of the
  codes from ``N(0, 1)``, half from ``U(-3, 3)`` (:func:`hybrid_latents`);
* generated images get labels in equal numbers per class (``n_gen_each_class``), classes in order.

Deviations (CPU-sized, any ``H x W`` divisible by 4):

* two stride-2 convolutions (32, 64 channels) instead of five (32..512), and two transposed convolutions
  back to ``H x W`` instead of six to 64x64 followed by a 12,288 x 3,072 dense layer (37.7 M weights);
  the sigmoid is applied to the last convolution directly;
* all images are trained on (the authors' Keras ``validation_split=0.05`` holds out 5 % of the few shots);
* :func:`generate` makes exactly ``count`` images: the remainder ``count % K`` goes one each to the first
  classes (the authors drop it), and the hybrid codes are randomly permuted before being paired with the
  class-ordered labels (in the authors' code the first half of the classes get only Gaussian codes and the
  second half only uniform ones, an artefact of concatenating the two halves in order).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from kdforge.errors import KDForgeError

log = logging.getLogger("kdforge")

CONV_CHANNELS = (32, 64)
"""Channels of the two stride-2 encoder convolutions (the first two of the authors' 32..512)."""
HIDDEN = (32, 16)
"""Dense widths between the feature map and the latent code (the authors' 32 and 16)."""
PREDICT_BATCH = 256
"""Batch size for decoding generated images (the authors' ``batch_size_predict``)."""


def _image_hw(image_size: int | tuple[int, int]) -> tuple[int, int]:
    height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if height < 4 or width < 4 or height % 4 or width % 4:
        raise KDForgeError(f"the FS-BBT CVAE needs image height and width divisible by 4, got {height}x{width}; "
                           "resize or pad the images (e.g. 28x28, 32x32)")
    return height, width


class CVAE(nn.Module):
    """Conditional VAE for ``(C, H, W)`` images in [0, 1] with ``H, W`` divisible by 4 (see the module doc)."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int | tuple[int, int], latent_dim: int = 2):
        super().__init__()
        if in_channels < 1 or num_classes < 1 or latent_dim < 1:
            raise KDForgeError(f"CVAE needs in_channels, num_classes and latent_dim >= 1, got {in_channels}, "
                               f"{num_classes}, {latent_dim}")
        self.in_channels, self.num_classes, self.latent_dim = in_channels, num_classes, latent_dim
        self.height, self.width = _image_hw(image_size)
        c1, c2 = CONV_CHANNELS
        h1, h2 = HIDDEN
        self.feature_shape = (c2, self.height // 4, self.width // 4)
        features = c2 * (self.height // 4) * (self.width // 4)
        self.cond_plane = nn.Linear(num_classes, self.height * self.width)
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channels + 1, c1, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(c1, c2, 4, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
            nn.Linear(features, h1), nn.ReLU(), nn.Linear(h1, h2), nn.ReLU())
        self.to_mu = nn.Linear(h2, latent_dim)
        self.to_logvar = nn.Linear(h2, latent_dim)
        self.decoder_dense = nn.Sequential(
            nn.Linear(latent_dim + num_classes, h2), nn.ReLU(), nn.Linear(h2, h1), nn.ReLU(),
            nn.Linear(h1, features))
        self.decoder_conv = nn.Sequential(
            nn.ConvTranspose2d(c2, c1, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(c1, in_channels, 4, stride=2, padding=1), nn.Sigmoid())

    def _one_hot(self, labels: torch.Tensor) -> torch.Tensor:
        return F.one_hot(labels.long(), self.num_classes).float()

    def encode(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mu, logvar)``, each ``(N, latent_dim)``, of ``q(z | x, y)``; ``labels`` are class ids."""
        plane = self.cond_plane(self._one_hot(labels)).view(-1, 1, self.height, self.width)
        hidden = self.encoder(torch.cat([images, plane], dim=1))
        return self.to_mu(hidden), self.to_logvar(hidden)

    def decode(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Images ``(N, C, H, W)`` in [0, 1] from codes ``(N, latent_dim)`` and class ids ``(N,)``."""
        hidden = self.decoder_dense(torch.cat([z, self._one_hot(labels)], dim=1))
        return self.decoder_conv(hidden.view(-1, *self.feature_shape))

    def forward(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(reconstruction, mu, logvar)`` with ``z = mu + exp(logvar / 2) * eps``, ``eps ~ N(0, I)``."""
        mu, logvar = self.encode(images, labels)
        eps = torch.randn(mu.shape, generator=generator).to(mu.device)
        return self.decode(mu + torch.exp(0.5 * logvar) * eps, labels), mu, logvar


def cvae_loss(recon: torch.Tensor, target: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Batch mean of ``sum_pixels BCE(recon, target) - 1/2 * sum_j (1 + logvar_j - mu_j^2 - exp(logvar_j))``.

    ``recon``, ``target``: ``(N, ...)`` in [0, 1]; ``mu``, ``logvar``: ``(N, latent_dim)``. E.g.
    ``recon = target = 0.5`` gives ``ln 2`` per pixel; ``mu = 1, logvar = 0`` gives ``1/2`` per latent dim."""
    bce = F.binary_cross_entropy(recon, target, reduction="none").flatten(1).sum(1)
    kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)
    return (bce + kl).mean()


def _check_training_data(images: torch.Tensor, labels: torch.Tensor, num_classes: int) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or not images.is_floating_point():
        raise KDForgeError("train_cvae needs float images (N, C, H, W) in [0, 1]; convert uint8 (N, H, W, C) "
                           "with x.permute(0, 3, 1, 2).float() / 255")
    if len(images) == 0:
        raise KDForgeError("train_cvae got no images; give the few-shot images to train the CVAE on")
    if images.min() < 0 or images.max() > 1:
        raise KDForgeError(f"train_cvae images must lie in [0, 1] (Bernoulli decoder), got "
                           f"[{float(images.min()):.3g}, {float(images.max()):.3g}]; scale them with x / 255")
    if labels.ndim != 1 or len(labels) != len(images) or labels.is_floating_point():
        raise KDForgeError(f"train_cvae needs one integer class id per image, got labels {tuple(labels.shape)} "
                           f"{labels.dtype} for {len(images)} images; pass the teacher's argmax labels")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise KDForgeError(f"train_cvae labels must be in [0, {num_classes - 1}], got "
                           f"[{int(labels.min())}, {int(labels.max())}]; check num_classes")


def train_cvae(images: torch.Tensor, labels: torch.Tensor, num_classes: int, epochs: int = 600,
               batch_size: int = 64, lr: float = 1e-3, seed: int = 0, latent_dim: int = 2,
               device: str | torch.device = "cpu") -> CVAE:
    """Train a :class:`CVAE` on ``images`` ``(N, C, H, W)`` in [0, 1] conditioned on ``labels`` (teacher argmax).

    Adam(``lr``), reshuffled mini-batches each epoch (the last one may be smaller), :func:`cvae_loss`.
    Defaults from the authors' CIFAR-10 run: 600 epochs, batch 64, lr 1e-3 (Keras Adam), latent 2.
    ``seed`` fixes the initial weights, the batch order and the noise (the global RNG is left untouched).
    The mean training loss of each epoch is kept in ``model.history``; progress is logged to the
    ``kdforge`` logger about ten times per run."""
    _check_training_data(images, labels, num_classes)
    if epochs < 1 or batch_size < 1 or not lr > 0:
        raise KDForgeError(f"train_cvae needs epochs >= 1, batch_size >= 1 and lr > 0, got {epochs}, "
                           f"{batch_size}, {lr}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CVAE(images.shape[1], num_classes, (images.shape[2], images.shape[3]), latent_dim).to(device)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    images, labels = images.to(device), labels.to(device)
    log_every = max(1, epochs // 10)
    history: list[float] = []
    model.train()
    for epoch in range(1, epochs + 1):
        total = 0.0
        for index in torch.randperm(len(images), generator=generator).split(batch_size):
            index = index.to(device)
            x, y = images[index], labels[index]
            recon, mu, logvar = model(x, y, generator=generator)
            loss = cvae_loss(recon, x, mu, logvar)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(index)
        history.append(total / len(images))
        if epoch % log_every == 0 or epoch == epochs:
            log.info("FS-BBT CVAE epoch %d/%d: loss %.3f", epoch, epochs, history[-1])
    model.history = history
    model.eval()
    return model


def hybrid_latents(n: int, latent_dim: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``(n, latent_dim)`` codes: the first ``n // 2`` rows from ``N(0, 1)``, the other ``n - n // 2`` from
    ``U(-3, 3)`` (the authors' "hybrid" sampling; they take ``int(n / 2)`` of each)."""
    if n < 0 or latent_dim < 1:
        raise KDForgeError(f"hybrid_latents needs n >= 0 and latent_dim >= 1, got {n}, {latent_dim}")
    gaussian = torch.randn(n // 2, latent_dim, generator=generator)
    uniform = torch.rand(n - n // 2, latent_dim, generator=generator) * 6 - 3
    return torch.cat([gaussian, uniform])


def class_counts(count: int, num_classes: int) -> list[int]:
    """``count`` split evenly over the classes; the remainder adds one to each of the first classes."""
    base, extra = divmod(count, num_classes)
    return [base + (label < extra) for label in range(num_classes)]


@torch.no_grad()
def generate(cvae: CVAE, count: int, num_classes: int, generator: torch.Generator | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` decoded images ``(count, C, H, W)`` in [0, 1] and their ``int64`` class ids.

    Labels are in class order with :func:`class_counts` per class (e.g. 25 over 10 classes:
    3,3,3,3,3,2,2,2,2,2); codes are :func:`hybrid_latents` in a random order (see the module doc)."""
    if num_classes != cvae.num_classes:
        raise KDForgeError(f"generate got num_classes={num_classes} but the CVAE was trained with "
                           f"{cvae.num_classes} classes; pass the CVAE's class count")
    if count < 0:
        raise KDForgeError(f"generate needs count >= 0, got {count}; pass the number of dropped MixUp pairs")
    labels = torch.repeat_interleave(torch.arange(num_classes), torch.tensor(class_counts(count, num_classes)))
    latents = hybrid_latents(count, cvae.latent_dim, generator)
    latents = latents[torch.randperm(count, generator=generator)]
    device = next(cvae.parameters()).device
    was_training = cvae.training
    cvae.eval()
    images = [cvae.decode(z.to(device), y.to(device)).cpu()
              for z, y in zip(latents.split(PREDICT_BATCH), labels.split(PREDICT_BATCH), strict=True)]
    cvae.train(was_training)
    empty = torch.empty(0, cvae.in_channels, cvae.height, cvae.width)
    return (torch.cat(images) if images else empty), labels
