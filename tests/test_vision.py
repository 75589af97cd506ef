"""Image tasks (cifar10, image_folder, digits), their collator and augmentation, and the CIFAR nets."""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from kdforge.config import TaskConfig
from kdforge.errors import KDForgeError
from kdforge.models.vision_nets import VISION_NETS, build_vision_net
from kdforge.tasks import vision
from kdforge.tasks.base import TASKS
from kdforge.tasks.vision import CIFAR10_MEAN, CIFAR10_STD, ImageCollator, random_crop, random_hflip

REAL_ZIP = Path("/work/shared/data/cifar10/cifar10-jpeg.zip")
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
COLORS = {"cat": (220, 40, 40), "airplane": (40, 220, 40), "dog": (40, 40, 220)}  # not in sorted order


def encode(color: tuple[int, int, int], size: tuple[int, int] = (32, 32), fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt)
    return buffer.getvalue()


def cifar_members(train: int = 4, test: int = 2) -> dict[str, bytes]:
    return {f"{split}/{label}/{i:04d}.jpg": encode(color)
            for split, count in (("train", train), ("test", test))
            for label, color in COLORS.items() for i in range(count)}


def write_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def write_tree(root: Path, members: dict[str, bytes]) -> Path:
    for name, data in members.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def make_task(name: str, data_dir: Path | str | None = None, **config):
    data_dir = None if data_dir is None else str(data_dir)
    return TASKS.get(name)(TaskConfig(name=name, data_dir=data_dir, **config))


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("KDFORGE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def tiny_zip(tmp_path, cache) -> Path:
    (tmp_path / "data").mkdir()
    return write_zip(tmp_path / "data" / "cifar10-jpeg.zip", cifar_members())


def load_error(name: str, data_dir: Path | None, split: str = "train") -> str:
    with pytest.raises(KDForgeError) as info:
        make_task(name, data_dir).split(split)
    message = str(info.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------- cifar10


def test_tasks_are_registered():
    assert {"cifar10", "image_folder", "digits"} <= set(TASKS.names())


def test_cifar10_reads_the_zip(tiny_zip):
    task = make_task("cifar10", tiny_zip)
    assert task.label_names == ["airplane", "cat", "dog"]
    assert (task.modality, task.eval_split, task.num_labels, task.in_channels) == ("image", "test", 3, 3)
    train, test = task.split("train"), task.split("test")
    assert (len(train), len(test)) == (12, 6)
    for example in (train[0], train[11], test[5]):
        image, label = example["image"], example["label"]
        assert isinstance(label, int) and image.dtype == torch.uint8 and image.shape == (32, 32, 3)
        color = np.array(COLORS[task.label_names[label]])
        assert np.abs(image.numpy().reshape(-1, 3).mean(0) - color).max() < 10  # JPEG is lossy
    assert np.bincount(train.labels).tolist() == [4, 4, 4]


@pytest.mark.parametrize("form", ["folder_with_zip", "extracted"])
def test_cifar10_data_dir_forms(tiny_zip, form):
    expected = make_task("cifar10", tiny_zip).split("train")
    data_dir = tiny_zip.parent
    if form == "extracted":
        data_dir = data_dir.parent / "extracted"
        with zipfile.ZipFile(tiny_zip) as archive:
            archive.extractall(data_dir)
    got = make_task("cifar10", data_dir).split("train")
    assert torch.equal(got.images, expected.images) and np.array_equal(got.labels, expected.labels)


def test_cache_is_reused(tiny_zip, cache, monkeypatch):
    first = make_task("cifar10", tiny_zip)
    first.split("train"), first.split("test")
    assert len(list((cache / "cifar10").glob("*.npz"))) == 2
    assert not list((cache / "cifar10").glob("*.tmp"))

    def no_decoding(*args):
        raise AssertionError("decoded although cached")

    monkeypatch.setattr(vision, "_read_image", no_decoding)
    again = make_task("cifar10", tiny_zip).split("train")
    assert torch.equal(again.images, first.split("train").images)


def test_cache_is_invalidated_when_the_zip_changes(tiny_zip, cache):
    task = make_task("cifar10", tiny_zip)
    assert len(task.split("train")) == 12
    fingerprint = task.fingerprint()
    write_zip(tiny_zip, cifar_members(train=5))
    changed = make_task("cifar10", tiny_zip)
    assert len(changed.split("train")) == 15
    assert changed.fingerprint() != fingerprint

    stat = tiny_zip.stat()  # same content and size, newer mtime: decoded again, not reused
    os.utime(tiny_zip, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    make_task("cifar10", tiny_zip).split("train")
    assert len(list((cache / "cifar10").glob("train-*.npz"))) == 3


def test_unreadable_cache_is_decoded_again(tiny_zip, cache):
    make_task("cifar10", tiny_zip).split("train")
    (cached,) = (cache / "cifar10").glob("train-*.npz")
    cached.write_bytes(b"not an npz")
    assert len(make_task("cifar10", tiny_zip).split("train")) == 12
    assert np.load(cached)["images"].shape == (12, 32, 32, 3)


# --------------------------------------------------------------------------- collator and augmentation


def test_collator_normalises(tiny_zip):
    task = make_task("cifar10", tiny_zip)
    examples = [{"image": torch.zeros(32, 32, 3, dtype=torch.uint8), "label": 2}, task.split("train")[0]]
    batch = task.collator()(examples)
    assert batch["pixel_values"].dtype == torch.float32 and batch["pixel_values"].shape == (2, 3, 32, 32)
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == [2, 0]
    expected = -torch.tensor(CIFAR10_MEAN) / torch.tensor(CIFAR10_STD)
    torch.testing.assert_close(batch["pixel_values"][0, :, 5, 7], expected)


def test_augmentation_keeps_shapes_and_is_deterministic():
    generator = torch.Generator().manual_seed(1)
    examples = [{"image": torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8, generator=generator),
                 "label": i % 3} for i in range(8)]
    collate = ImageCollator(CIFAR10_MEAN, CIFAR10_STD, augment=True)
    torch.manual_seed(0)
    first = collate(examples)
    torch.manual_seed(0)
    second = collate(examples)
    assert first["pixel_values"].shape == (8, 3, 32, 32)
    torch.testing.assert_close(first["pixel_values"], second["pixel_values"], rtol=0, atol=0)
    plain = ImageCollator(CIFAR10_MEAN, CIFAR10_STD)(examples)["pixel_values"]
    assert not torch.equal(first["pixel_values"], plain)


def test_random_crop_is_a_window_of_the_zero_padded_image():
    torch.manual_seed(0)
    images = torch.randint(1, 256, (6, 8, 8, 3), dtype=torch.uint8)
    cropped = random_crop(images, padding=2)
    padded = torch.zeros(6, 12, 12, 3, dtype=torch.uint8)
    padded[:, 2:10, 2:10] = images
    offsets = set()
    for image, source in zip(cropped, padded, strict=True):
        matches = [(dy, dx) for dy in range(5) for dx in range(5)
                   if torch.equal(image, source[dy:dy + 8, dx:dx + 8])]
        assert len(matches) == 1
        offsets.add(matches[0])
    assert len(offsets) > 1


def test_random_hflip_flips():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (16, 4, 5, 3), dtype=torch.uint8)
    out = random_hflip(images)
    flipped = [torch.equal(o, i.flip(1)) for o, i in zip(out, images, strict=True)]
    kept = [torch.equal(o, i) for o, i in zip(out, images, strict=True)]
    assert all(f != k for f, k in zip(flipped, kept, strict=True))
    assert any(flipped) and any(kept)


def test_dataloader_batches(tiny_zip):
    task = make_task("cifar10", tiny_zip, train_limit=5)
    loader = DataLoader(task.split("train"), batch_size=4, collate_fn=task.collator(train=True))
    shapes = [tuple(batch["pixel_values"].shape) for batch in loader]
    assert shapes == [(4, 3, 32, 32), (1, 3, 32, 32)]


def test_compute_metrics(tiny_zip):
    task = make_task("cifar10", tiny_zip)
    logits = np.array([[2.0, 1.0, 0.0], [0.0, 1.0, 3.0], [0.0, 5.0, 1.0], [1.0, 0.0, 0.0]])
    assert task.compute_metrics(logits, np.array([0, 2, 0, 1])) == {"accuracy": 0.5}
    assert task.main_metric == "accuracy"


# --------------------------------------------------------------------------- errors


def test_error_missing_path(tmp_path, cache):
    assert "does not exist" in load_error("cifar10", tmp_path / "nowhere.zip")


def test_error_folder_without_data(tmp_path, cache):
    message = load_error("cifar10", tmp_path)
    assert "cifar10-jpeg.zip" in message and "train/<class>/" in message and "task.data_dir" in message


def test_error_not_a_zip(tmp_path, cache):
    (tmp_path / "c.zip").write_text("hello")
    assert "not a zip file" in load_error("cifar10", tmp_path / "c.zip")


def test_error_zip_without_test_split(tmp_path, cache):
    members = {k: v for k, v in cifar_members().items() if k.startswith("train/")}
    message = load_error("cifar10", write_zip(tmp_path / "c.zip", members))
    assert "test/" in message and "no evaluation folder" in message


def test_error_zip_without_train_classes(tmp_path, cache):
    members = {k: v for k, v in cifar_members().items() if k.startswith("test/")}
    members["train/readme.txt"] = b"no class folders"
    assert "no train/<class>/ image folders" in load_error("cifar10", write_zip(tmp_path / "c.zip", members))


def test_error_unreadable_image(tmp_path, cache):
    members = cifar_members()
    members["train/cat/0001.jpg"] = b"this is not a jpeg"
    message = load_error("cifar10", write_zip(tmp_path / "c.zip", members))
    assert "cannot read image train/cat/0001.jpg" in message and "replace or delete" in message


@pytest.mark.parametrize("form", ["zip", "folder"])
def test_error_empty_class_folder(tmp_path, cache, form):
    if form == "zip":
        data_dir = write_zip(tmp_path / "c.zip", {**cifar_members(), "train/zebra/": b""})
    else:
        data_dir = write_tree(tmp_path / "tree", cifar_members())
        (data_dir / "train" / "zebra").mkdir()
    message = load_error("cifar10", data_dir)
    assert "class folder train/zebra" in message and "no images" in message


def test_error_eval_class_not_in_train(tmp_path, cache):
    members = {**cifar_members(), "test/zebra/0000.jpg": encode((0, 0, 0))}
    message = load_error("cifar10", write_zip(tmp_path / "c.zip", members))
    assert "test/zebra" in message and "not a train class" in message


# --------------------------------------------------------------------------- image_folder


def folder_members(eval_split: str = "val", size: tuple[int, int] = (12, 10)) -> dict[str, bytes]:
    return {f"{split}/{label}/{i}.png": encode(color, size, "PNG")
            for split in ("train", eval_split) for label, color in (("b", (9, 9, 9)), ("a", (200, 0, 0)))
            for i in range(3)}


def test_image_folder_reads_png_and_picks_the_eval_split(tmp_path, cache):
    root = write_tree(tmp_path / "images", {**folder_members("test"), **folder_members("val")})
    task = make_task("image_folder", root)
    assert (task.label_names, task.eval_split) == (["a", "b"], "val")
    val = task.split("val")
    assert len(val) == 6 and val[0]["image"].shape == (10, 12, 3) and val[0]["label"] == 0
    assert val[0]["image"][0, 0].tolist() == [200, 0, 0]  # PNG is lossless
    assert list((cache / "image_folder").glob("val-*.npz"))
    assert make_task("image_folder", write_tree(tmp_path / "d", folder_members("dev"))).eval_split == "dev"


def test_image_folder_errors(tmp_path, cache):
    assert "task.data_dir" in load_error("image_folder", None)
    no_eval = write_tree(tmp_path / "no_eval", {k: v for k, v in folder_members().items() if "train/" in k})
    assert "val/, dev/, test/" in load_error("image_folder", no_eval)
    big = encode((0, 0, 0), (20, 20), "PNG")
    mixed = write_tree(tmp_path / "mixed", {**folder_members(), "train/b/big.png": big})
    message = load_error("image_folder", mixed)
    assert "train/b/big.png" in message and "20x20" in message and "resize" in message


# --------------------------------------------------------------------------- digits


def test_digits_split():
    task = make_task("digits")
    train, test = task.split("train"), task.split("test")
    assert (len(train), len(test)) == (1437, 360)
    assert (task.in_channels, task.num_labels, task.eval_split) == (1, 10, "test")
    assert train[0]["image"].shape == (8, 8, 1) and train[0]["image"].dtype == torch.uint8
    assert int(train.images.max()) == 255
    train_counts, test_counts = np.bincount(train.labels), np.bincount(test.labels)
    assert np.all(np.abs(test_counts - 0.2 * (train_counts + test_counts)) <= 1)  # stratified
    assert torch.equal(make_task("digits").split("test").images, test.images)
    assert not torch.equal(make_task("digits", sample_seed=1).split("test").images, test.images)
    assert len(make_task("digits", train_limit=100).split("train")) == 100


def test_digits_collator_crops_but_does_not_flip():
    task = make_task("digits")
    collate = task.collator(train=True)
    assert collate.hflip is False and make_task("digits").collator().augment is False
    torch.manual_seed(0)
    batch = collate([task.split("train")[i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 1, 8, 8)
    with pytest.raises(KDForgeError, match="splits 'train' and 'test'"):
        task.split("dev")


# --------------------------------------------------------------------------- nets



@pytest.mark.parametrize("name", VISION_NETS.names())
def test_net_output_shape_and_module_names(name, one_thread):
    net = build_vision_net(name, num_classes=10).eval()
    with torch.no_grad():
        assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    modules = dict(net.named_modules())
    assert {"stem", "layer1", "layer2", "layer3", "post_act", "pool", "fc"} <= set(modules)


def test_nets_take_other_inputs(one_thread):
    with torch.no_grad():
        assert build_vision_net("small_cnn", 10, in_channels=1)(torch.randn(2, 1, 8, 8)).shape == (2, 10)
        assert build_vision_net("resnet8", 4, in_channels=1)(torch.randn(2, 1, 20, 24)).shape == (2, 4)


# Published parameter counts on CIFAR-100 (CRD, Tian et al. 2020; He et al. 2016; Zagoruyko & Komodakis 2016)
@pytest.mark.parametrize(("name", "published"), [
    ("resnet8x4", 1.23e6), ("resnet32x4", 7.43e6), ("wrn_40_2", 2.25e6), ("wrn_16_2", 0.70e6),
    ("wrn_40_1", 0.57e6), ("resnet20", 0.28e6), ("resnet56", 0.86e6), ("resnet110", 1.74e6),
])
def test_parameter_counts_match_the_papers(name, published):
    count = sum(p.numel() for p in build_vision_net(name, num_classes=100).parameters())
    assert count == pytest.approx(published, rel=0.01)


# The CIFAR-10 ResNet ladder of the capacity-gap studies: He et al. 2016, Table 6 (0.27M, 0.46M, 0.66M, 0.85M)
@pytest.mark.parametrize(("name", "published"), [
    ("resnet20", 0.27e6), ("resnet32", 0.46e6), ("resnet44", 0.66e6), ("resnet56", 0.85e6)])
def test_the_cifar10_ladder_matches_he_et_al(name, published):
    count = sum(p.numel() for p in build_vision_net(name, num_classes=10).parameters())
    assert count == pytest.approx(published, rel=0.02)


def test_unknown_net():
    with pytest.raises(KDForgeError, match="unknown vision net 'resnet9'.*known: resnet110"):
        build_vision_net("resnet9", 10)


# --------------------------------------------------------------------------- the real data


@pytest.mark.skipif(not REAL_ZIP.is_file(), reason=f"{REAL_ZIP} not present")
def test_real_cifar10_test_split():
    """Decodes the test split once (~2 s) into kdforge's cache, then reads it from there."""
    task = make_task("cifar10", REAL_ZIP)
    test = task.split("test")
    assert task.label_names == CIFAR10_CLASSES
    assert len(test) == 10_000 and np.bincount(test.labels).tolist() == [1000] * 10
    assert test[0]["image"].shape == (32, 32, 3)
