"""FS-BBT building blocks (Nguyen et al., ECCV 2022): MixUp pool, batch mixup, CVAE, soft labels."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdforge.errors import KDForgeError
from kdforge.fsbbt.cvae import CVAE, class_counts, cvae_loss, generate, hybrid_latents, train_cvae
from kdforge.fsbbt.mixup import batch_mixup, beta_sample, mixup_pool
from kdforge.fsbbt.soft_labels import SoftLabelCollator, SoftLabelDataset, soft_cross_entropy
from kdforge.tasks.vision import ImageCollator, normalize

pytestmark = pytest.mark.usefixtures("one_thread")


def one_hot_images(n: int, size: int = 2) -> torch.Tensor:
    """Image i is 1 on channel i and 0 elsewhere, so a mix of images a != b shows lam and 1 - lam."""
    return torch.eye(n).view(n, n, 1, 1).expand(n, n, size, size).contiguous()


# --------------------------------------------------------------------------- MixUp pool


def test_mixup_pool_keeps_only_rounded_lambdas_inside_the_thresholds():
    n, copies = 4, 2500
    mixed, dropped = mixup_pool(one_hot_images(n), copies, torch.Generator().manual_seed(0))
    assert mixed.shape[1:] == (n, 2, 2)
    assert len(mixed) + dropped == copies * n
    channels = mixed[:, :, 0, 0]
    assert torch.allclose(channels.sum(1), torch.ones(len(mixed)))
    distinct = channels.max(1).values < 1 - 1e-6  # a pair of two different images
    assert 0.6 < distinct.float().mean() < 0.9  # 3/4 of random pairs of 4 images differ
    values = channels[distinct]
    lam = values[values > 1e-6]  # lam and 1 - lam of each mixed pair
    assert len(lam) == 2 * int(distinct.sum())
    assert bool(((lam > 0.05) & (lam < 0.95)).all())
    assert torch.allclose(lam * 100, torch.round(lam * 100), atol=1e-4)  # 2 decimals
    # every kept lambda value of the grid 0.06 .. 0.94 occurs, nothing else
    assert set(torch.round(lam * 100).int().tolist()) == set(range(6, 95))
    # Beta(1, 1) rounded to 2 decimals: P(lam <= 0.05) = P(u < 0.055), P(lam >= 0.95) = P(u >= 0.945)
    expected, total = 0.11, copies * n
    assert abs(dropped / total - expected) < 4 * math.sqrt(expected * (1 - expected) / total)


def test_mixup_pool_dropped_count_matches_the_drawn_lambdas():
    images, copies, seed = one_hot_images(3), 50, 7
    mixed, dropped = mixup_pool(images, copies, torch.Generator().manual_seed(seed))
    # replay the documented draw order: two permutations, then the lambdas
    replay = torch.Generator().manual_seed(seed)
    total = copies * len(images)
    first, second = torch.randperm(total, generator=replay), torch.randperm(total, generator=replay)
    lam = torch.round(beta_sample(1.0, total, replay), decimals=2)
    outside = (lam <= 0.05) | (lam >= 0.95)
    assert dropped == int(outside.sum()) > 0
    pool = images.repeat(copies, 1, 1, 1)
    keep_lam = lam[~outside].float().view(-1, 1, 1, 1)
    expected = keep_lam * pool[first[~outside]] + (1 - keep_lam) * pool[second[~outside]]
    assert torch.allclose(mixed, expected)


def test_mixup_pool_thresholds_decide_what_is_dropped():
    images, copies = one_hot_images(4), 200
    mixed, dropped = mixup_pool(images, copies, torch.Generator().manual_seed(1), low=-1.0, high=2.0)
    assert dropped == 0 and len(mixed) == copies * 4
    mixed, dropped = mixup_pool(images, copies, torch.Generator().manual_seed(1), low=0.49, high=0.51)
    channels = mixed[:, :, 0, 0]
    distinct = channels.max(1).values < 1 - 1e-6
    assert distinct.any()
    assert torch.allclose(channels[distinct].max(1).values, torch.full((int(distinct.sum()),), 0.5))
    assert 0 < len(mixed) < 0.05 * copies * 4 and len(mixed) + dropped == copies * 4  # P(lam = 0.50) = 0.01
    with pytest.raises(KDForgeError, match="low < high"):
        mixup_pool(images, 2, torch.Generator(), low=0.9, high=0.1)
    with pytest.raises(KDForgeError, match="copies"):
        mixup_pool(images, 0, torch.Generator())
    with pytest.raises(KDForgeError, match="float tensor"):
        mixup_pool(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), 2, torch.Generator())


# --------------------------------------------------------------------------- batch mixup


def test_batch_mixup_uses_one_lambda_and_permutation_for_inputs_and_targets():
    size = 64
    targets = torch.eye(size)
    inputs = 2 * targets.view(size, size, 1, 1)
    mixed_x, mixed_y = batch_mixup(inputs, targets, alpha=1.0, generator=torch.Generator().manual_seed(3))
    assert mixed_x.shape == inputs.shape and mixed_y.shape == targets.shape
    assert torch.allclose(mixed_x.flatten(1), 2 * mixed_y)  # same lambda and partner for x and y
    assert torch.allclose(mixed_y.sum(1), torch.ones(size))
    own = mixed_y.diagonal()  # lam_i (or 1 when sample i is its own partner)
    partner = (mixed_y - torch.diag(own)).argmax(1)
    moved = own < 1 - 1e-6
    assert sorted(partner[moved].tolist()) == sorted(set(partner[moved].tolist()))  # a permutation
    assert torch.allclose(mixed_y[moved, partner[moved]], 1 - own[moved])
    assert len(set(torch.round(own[moved], decimals=5).tolist())) > size // 2  # one lambda per sample
    assert own[moved].std() > 0.15  # Beta(1, 1) has std 0.29


def test_batch_mixup_is_reproducible_and_checks_shapes():
    x, y = torch.randn(8, 3), torch.softmax(torch.randn(8, 5), 1)
    first = batch_mixup(x, y, generator=torch.Generator().manual_seed(5))
    second = batch_mixup(x, y, generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    with pytest.raises(KDForgeError, match="same B"):
        batch_mixup(x, y[:4])


# --------------------------------------------------------------------------- CVAE


def test_cvae_loss_known_values():
    recon = target = torch.full((2, 3, 4, 4), 0.5)
    zeros = torch.zeros(2, 2)
    pixels = 3 * 4 * 4
    assert cvae_loss(recon, target, zeros, zeros).item() == pytest.approx(pixels * math.log(2), rel=1e-6)
    # KL(N(1, 1) || N(0, 1)) = 1/2 per latent dim
    ones = torch.ones(2, 2)
    assert cvae_loss(recon, target, ones, zeros).item() == pytest.approx(pixels * math.log(2) + 1.0, rel=1e-6)
    # variance 2: KL = 1/2 * (2 - 1 - ln 2) per dim; BCE(0.25, 1) = ln 4 per pixel; mean over the batch
    mu = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    logvar = torch.full((2, 2), math.log(2))
    recon = torch.full((2, 3, 4, 4), 0.25)
    expected = pixels * math.log(4) + 0.5 * (2 * 0.5 * (1 - math.log(2)) + 2 * 0.5 * (2 - math.log(2)))
    assert cvae_loss(recon, torch.ones(2, 3, 4, 4), mu, logvar).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("channels, size", [(3, 32), (1, 8)])
def test_cvae_shapes(channels, size):
    torch.manual_seed(0)
    model = CVAE(channels, num_classes=10, image_size=size)
    images, labels = torch.rand(5, channels, size, size), torch.arange(5)
    mu, logvar = model.encode(images, labels)
    assert mu.shape == logvar.shape == (5, 2)
    decoded = model.decode(torch.randn(5, 2), labels)
    assert decoded.shape == (5, channels, size, size)
    assert decoded.min() >= 0 and decoded.max() <= 1
    recon, mu, _ = model(images, labels)
    assert recon.shape == images.shape and mu.shape == (5, 2)
    # the label changes the code and the image (class-conditional)
    assert not torch.allclose(model.encode(images, labels)[0], model.encode(images, (labels + 1) % 10)[0])
    assert not torch.allclose(model.decode(mu, labels), model.decode(mu, (labels + 1) % 10))


def test_cvae_rejects_sizes_not_divisible_by_4():
    with pytest.raises(KDForgeError, match="divisible by 4"):
        CVAE(3, 10, 30)


def test_hybrid_latents_half_gaussian_half_uniform():
    n = 20000
    z = hybrid_latents(n, 2, torch.Generator().manual_seed(0))
    gaussian, uniform = z[: n // 2], z[n // 2:]
    assert z.shape == (n, 2)
    assert abs(gaussian.mean()) < 0.05 and abs(gaussian.std() - 1) < 0.03
    assert gaussian.abs().max() > 3  # Gaussian tails leave [-3, 3] (P = 0.0027 per value)
    assert uniform.min() >= -3 and uniform.max() <= 3
    assert abs(uniform.std() - math.sqrt(3)) < 0.03  # std of U(-3, 3) = 6 / sqrt(12)
    assert hybrid_latents(5, 3, torch.Generator()).shape == (5, 3)


def test_generate_equal_counts_per_class():
    assert class_counts(25, 10) == [3, 3, 3, 3, 3, 2, 2, 2, 2, 2]
    torch.manual_seed(0)
    model = CVAE(1, 10, 8)
    images, labels = generate(model, 25, 10, torch.Generator().manual_seed(0))
    assert images.shape == (25, 1, 8, 8) and labels.dtype == torch.long
    assert labels.tolist() == [c for c, k in enumerate([3] * 5 + [2] * 5) for _ in range(k)]
    assert images.min() >= 0 and images.max() <= 1
    empty, no_labels = generate(model, 0, 10, torch.Generator())
    assert empty.shape == (0, 1, 8, 8) and no_labels.shape == (0,)
    with pytest.raises(KDForgeError, match="num_classes"):
        generate(model, 5, 3, torch.Generator())


def tiny_two_class_images(n: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    """Class 0: bright top half, class 1: bright left half (8x8, one channel), with pixel noise."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 2
    images = torch.full((n, 1, 8, 8), 0.1)
    images[labels == 0, :, :4, :] = 0.9
    images[labels == 1, :, :, :4] = 0.9
    return (images + 0.05 * torch.rand(images.shape, generator=g)).clamp(0, 1), labels


def test_train_cvae_reduces_its_loss(kdlog):
    images, labels = tiny_two_class_images()

    def loss_at_mean(model: CVAE) -> float:
        with torch.no_grad():
            mu, logvar = model.encode(images, labels)
            return cvae_loss(model.decode(mu, labels), images, mu, logvar).item()

    short = train_cvae(images, labels, 2, epochs=1, batch_size=16, lr=3e-3, seed=0)
    kdlog.clear()
    long = train_cvae(images, labels, 2, epochs=30, batch_size=16, lr=3e-3, seed=0)
    progress = [r.getMessage() for r in kdlog if "CVAE epoch" in r.getMessage()]
    assert len(progress) == 10 and progress[-1].startswith("FS-BBT CVAE epoch 30/30")
    assert len(long.history) == 30 and long.history[0] == pytest.approx(short.history[0])  # same seed
    assert long.history[-1] < 0.8 * long.history[0]
    assert loss_at_mean(long) < 0.8 * loss_at_mean(short)
    # the trained decoder draws the class it is asked for
    generated, gen_labels = generate(long, 20, 2, torch.Generator().manual_seed(0))
    top_minus_left = generated[:, 0, :4, 4:].mean((1, 2)) - generated[:, 0, 4:, :4].mean((1, 2))
    assert bool((top_minus_left[gen_labels == 0] > 0).all() and (top_minus_left[gen_labels == 1] < 0).all())


def test_train_cvae_rejects_bad_input():
    images, labels = tiny_two_class_images(4)
    with pytest.raises(KDForgeError, match="float images"):
        train_cvae((images * 255).to(torch.uint8), labels, 2, epochs=1)
    with pytest.raises(KDForgeError, match="labels must be in"):
        train_cvae(images, labels + 1, 2, epochs=1)
    with pytest.raises(KDForgeError, match=r"\[0, 1\]"):
        train_cvae(images * 2, labels, 2, epochs=1)


# --------------------------------------------------------------------------- soft labels


def test_soft_cross_entropy_matches_ce_and_has_softmax_gradient():
    torch.manual_seed(0)
    logits = torch.randn(6, 4, requires_grad=True)
    hard = torch.tensor([0, 3, 1, 2, 2, 0])
    assert soft_cross_entropy(logits, F.one_hot(hard, 4).float()).item() == pytest.approx(
        F.cross_entropy(logits, hard).item(), rel=1e-6)
    targets = torch.softmax(torch.randn(6, 4), 1)
    soft_cross_entropy(logits, targets).backward()
    assert torch.allclose(logits.grad, (torch.softmax(logits, 1) - targets).detach() / 6, atol=1e-6)
    with pytest.raises(KDForgeError, match="one shape"):
        soft_cross_entropy(logits, targets[:, :3])


def test_soft_label_dataset_collates_like_kdforge_images():
    torch.manual_seed(0)
    images = torch.rand(5, 3, 4, 4)
    probs = torch.softmax(torch.randn(5, 10), 1)
    dataset = SoftLabelDataset(images, probs)
    item = dataset[2]
    assert set(item) == {"image", "label", "soft_labels"}
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (4, 4, 3)
    assert torch.equal(item["image"], torch.round(images[2] * 255).to(torch.uint8).permute(1, 2, 0))
    assert item["label"] == int(probs[2].argmax())
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    batch = SoftLabelCollator(mean, std)([dataset[i] for i in range(5)])
    assert set(batch) == {"pixel_values", "labels", "soft_labels"}
    assert torch.allclose(batch["pixel_values"], normalize(dataset.images, mean, std))
    assert torch.allclose(batch["pixel_values"], (images - 0.5) / 0.25, atol=2 / 255 / 0.25)
    assert torch.equal(batch["labels"], probs.argmax(1)) and torch.equal(batch["soft_labels"], probs)
    plain = ImageCollator(mean, std)([dataset[i] for i in range(5)])  # kdforge's collator accepts the items
    assert torch.equal(plain["pixel_values"], batch["pixel_values"])
    # uint8 (N, H, W, C) is kept as is
    raw = (torch.rand(5, 4, 4, 3) * 255).to(torch.uint8)
    assert torch.equal(SoftLabelDataset(raw, probs)[0]["image"], raw[0])
    with pytest.raises(KDForgeError, match="softmax"):
        SoftLabelDataset(images, torch.randn(5, 10))
    with pytest.raises(KDForgeError, match=r"probs \(N, K\)"):
        SoftLabelDataset(images, probs[:3])
