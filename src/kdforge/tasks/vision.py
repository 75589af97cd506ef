"""Image classification tasks: CIFAR-10 (JPEG zip), a generic image folder, and scikit-learn digits.

Images are decoded once into a ``uint8`` array ``(N, H, W, C)`` plus ``int64`` labels and served by
:class:`ImageArrayDataset` as ``{"image": uint8 tensor (H, W, C), "label": int}``. Decoded splits of
``cifar10`` and ``image_folder`` are cached as ``.npz`` under ``kdforge.paths.cache_dir()``, keyed by a
fingerprint of the data (a zip's path, size and mtime; a folder's file names, sizes and mtimes), so a
changed dataset is decoded again instead of being silently reused.

On-disk layout (a folder or a zip archive)::

    train/<class>/<image>.{jpg,jpeg,png}
    <eval>/<class>/<image>...        # cifar10: test/; image_folder: the first of val/, dev/, test/

Class names sorted alphabetically are the label ids (for CIFAR-10: airplane, automobile, bird, cat,
deer, dog, frog, horse, ship, truck -- its canonical order).

The collator converts a batch to normalised ``float32`` ``(N, C, H, W)`` ``pixel_values``; for training
it applies the standard CIFAR augmentation (He et al., 2016): a random crop of the image zero-padded
by ``min(H, W) // 8`` pixels (4 for 32x32) and, except for digits, a random horizontal flip. Random
numbers come from the global torch RNG, which the training engine seeds and checkpoints.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
import zipfile
from abc import abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from kdforge.config import TaskConfig
from kdforge.errors import KDForgeError
from kdforge.paths import cache_dir, resolve_data_path
from kdforge.tasks.base import TASKS, Task
from kdforge.tasks.metrics import accuracy

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
_CACHE_VERSION = 1
"""Bump when the decoding changes, so old caches are not reused."""

ClassFiles = dict[str, list[str]]
"""Class folder name -> member names (``split/class/file``) of its images, both sorted."""


# --------------------------------------------------------------------------- dataset and collator


class ImageArrayDataset(Dataset):
    """A split held as one ``uint8`` array ``(N, H, W, C)`` and ``N`` integer labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        if images.ndim != 4 or images.dtype != np.uint8 or len(images) != len(labels):
            raise ValueError(f"expected uint8 images (N, H, W, C) and N labels, got {images.dtype} "
                             f"{images.shape} and {len(labels)} labels")
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": self.images[i], "label": int(self.labels[i])}


def crop_padding(height: int, width: int) -> int:
    """Zero padding of the random-crop augmentation: 4 px for 32x32 (CIFAR), 1 px for 8x8."""
    return max(1, min(height, width) // 8)


def random_crop(images: torch.Tensor, padding: int) -> torch.Tensor:
    """Per image, a random ``H x W`` window of the image zero-padded by ``padding`` on each side.

    ``images``: ``(N, H, W, C)``; offsets are drawn from the global torch RNG."""
    n, height, width, _ = images.shape
    padded = F.pad(images, (0, 0, padding, padding, padding, padding))
    top, left = torch.randint(0, 2 * padding + 1, (2, n))
    rows = (top[:, None] + torch.arange(height))[:, :, None]
    cols = (left[:, None] + torch.arange(width))[:, None, :]
    return padded[torch.arange(n)[:, None, None], rows, cols]


def random_hflip(images: torch.Tensor) -> torch.Tensor:
    """Mirror each image of ``(N, H, W, C)`` left-right with probability 1/2 (global torch RNG)."""
    flip = torch.rand(images.shape[0]) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(2), images)


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """``uint8 (N, H, W, C)`` -> ``float32 (N, C, H, W)``: ``(x / 255 - mean) / std`` per channel."""
    x = images.permute(0, 3, 1, 2).float().div_(255)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return ((x - mean_t) / std_t).contiguous()


@dataclass(frozen=True)
class ImageCollator:
    """``collate_fn`` turning image examples into ``{"pixel_values", "labels"}`` (picklable for workers)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool = False
    hflip: bool = True

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        images = torch.stack([example["image"] for example in examples])
        if self.augment:
            images = random_crop(images, crop_padding(images.shape[1], images.shape[2]))
            if self.hflip:
                images = random_hflip(images)
        labels = torch.tensor([example["label"] for example in examples], dtype=torch.long)
        return {"pixel_values": normalize(images, self.mean, self.std), "labels": labels}


# --------------------------------------------------------------------------- task base


class ImageClassificationTask(Task):
    """An image task whose splits are decoded into :class:`ImageArrayDataset` (memoised per split)."""

    modality = "image"
    problem_type = "classification"
    main_metric = "accuracy"
    eval_split = "test"
    random_train_inputs = True  # random crop (and flip) in the training collator
    in_channels: ClassVar[int] = 3
    mean: ClassVar[tuple[float, ...]] = (0.5, 0.5, 0.5)
    std: ClassVar[tuple[float, ...]] = (0.5, 0.5, 0.5)
    hflip: ClassVar[bool] = True

    def __init__(self, config: TaskConfig):
        super().__init__(config)
        self._loaded: dict[str, ImageArrayDataset] = {}

    def load_split(self, split: str) -> ImageArrayDataset:
        if split not in ("train", self.eval_split):
            raise KDForgeError(f"task {self.name} has the splits 'train' and {self.eval_split!r}, "
                               f"not {split!r}")
        if split not in self._loaded:
            self._loaded[split] = self._load_arrays(split)
        return self._loaded[split]

    @abstractmethod
    def _load_arrays(self, split: str) -> ImageArrayDataset:
        """Decode (or read from the cache) all images of ``split``."""

    def compute_metrics(self, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        class_ids, labels = self.problem.metric_inputs(predictions, labels)
        return {"accuracy": accuracy(class_ids, labels)}

    def collator(self, tokenizer: Any = None, train: bool = False) -> ImageCollator:
        return ImageCollator(self.mean, self.std, augment=train, hflip=self.hflip)


# --------------------------------------------------------------------------- image trees (folder / zip)


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


class _ZipSource:
    """A ``<split>/<class>/<image>`` tree inside a zip archive."""

    def __init__(self, path: Path):
        self.location = path
        try:
            with zipfile.ZipFile(path) as archive:
                self._names = archive.namelist()
        except (zipfile.BadZipFile, OSError) as err:
            raise KDForgeError(f"cannot open the zip {path} ({err}); re-create or re-download it") from None

    def splits(self) -> set[str]:
        return {name.split("/", 1)[0] for name in self._names if "/" in name}

    def class_files(self, split: str) -> ClassFiles:
        groups: ClassFiles = {}
        for name in self._names:
            parts = name.split("/")
            if len(parts) != 3 or parts[0] != split or not parts[1] or parts[1].startswith("."):
                continue
            files = groups.setdefault(parts[1], [])  # a directory entry ``split/class/`` counts too
            if _is_image(parts[2]):
                files.append(name)
        return {label: sorted(files) for label, files in sorted(groups.items())}

    def fingerprint(self, names: list[str]) -> str:
        stat = self.location.stat()
        return f"zip:{self.location.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"

    @contextmanager
    def reader(self) -> Iterator[Callable[[str], bytes]]:
        with zipfile.ZipFile(self.location) as archive:
            yield archive.read


class _FolderSource:
    """A ``<split>/<class>/<image>`` tree in a folder."""

    def __init__(self, path: Path):
        self.location = path

    def splits(self) -> set[str]:
        return {entry.name for entry in self.location.iterdir() if entry.is_dir()}

    def class_files(self, split: str) -> ClassFiles:
        split_dir = self.location / split
        return {
            class_dir.name: sorted(f"{split}/{class_dir.name}/{file.name}" for file in class_dir.iterdir()
                                   if _is_image(file.name) and file.is_file())
            for class_dir in sorted(split_dir.iterdir())
            if class_dir.is_dir() and not class_dir.name.startswith(".")
        }

    def fingerprint(self, names: list[str]) -> str:
        digest = hashlib.sha256(str(self.location.resolve()).encode())
        for name in names:
            stat = (self.location / name).stat()
            digest.update(f"\0{name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        return f"folder:{digest.hexdigest()}"

    @contextmanager
    def reader(self) -> Iterator[Callable[[str], bytes]]:
        yield lambda name: (self.location / name).read_bytes()


_Source = _ZipSource | _FolderSource


def _open_source(path: Path, archive_name: str | None) -> _Source:
    """A zip file, a folder holding ``archive_name``, or an extracted folder with ``train/``."""
    if path.is_file():
        if not zipfile.is_zipfile(path):
            raise KDForgeError(f"{path} is not a zip file; set `task.data_dir` to a zip or a folder "
                               "with train/<class>/ images")
        return _ZipSource(path)
    if archive_name and (path / archive_name).is_file():
        return _ZipSource(path / archive_name)
    if (path / "train").is_dir():
        return _FolderSource(path)
    wanted = f"{archive_name} or " if archive_name else ""
    raise KDForgeError(f"{path} holds neither {wanted}a train/<class>/ image folder; "
                       "set `task.data_dir` to the zip or the extracted folder")


def _read_image(read: Callable[[str], bytes], name: str, location: Path) -> np.ndarray:
    """Decode one image to ``uint8 (H, W, 3)`` RGB; an unreadable file is a one-line error naming it."""
    try:
        with Image.open(io.BytesIO(read(name))) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, zipfile.BadZipFile, Image.DecompressionBombError) as err:
        raise KDForgeError(f"cannot read image {name} in {location} ({err}); replace or delete that file") \
            from None


def _decode_images(source: _Source, names: list[str], desc: str) -> np.ndarray:
    """All ``names`` decoded into one ``(N, H, W, 3)`` array; every image must have the first's size."""
    images: np.ndarray | None = None
    with source.reader() as read:
        for i, name in enumerate(tqdm(names, desc=desc, unit="img", mininterval=0.5)):
            array = _read_image(read, name, source.location)
            if images is None:
                images = np.empty((len(names), *array.shape), dtype=np.uint8)
            elif array.shape != images.shape[1:]:
                raise KDForgeError(
                    f"image {name} in {source.location} is {array.shape[1]}x{array.shape[0]} but {names[0]} "
                    f"is {images.shape[2]}x{images.shape[1]}; resize all images to one size first")
            images[i] = array
    assert images is not None, "called with no names"
    return images


def _load_cache(path: Path, labels: np.ndarray) -> np.ndarray | None:
    """The cached images if ``path`` holds a complete cache of images with these ``labels``."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as cached:
            images, cached_labels = cached["images"], cached["labels"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        log.warning("ignoring the unreadable cache %s (%s); decoding again", path, err)
        return None
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) != len(labels) \
            or not np.array_equal(cached_labels, labels):
        log.warning("ignoring the inconsistent cache %s; decoding again", path)
        return None
    return images


def _save_cache(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """Write the cache atomically (temporary file, then ``os.replace``); failures only warn."""
    tmp_name = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, images=images, labels=labels)
        os.chmod(tmp_name, 0o644)  # mkstemp makes it private
        os.replace(tmp_name, path)
    except OSError as err:
        log.warning("could not write the image cache %s (%s); images will be decoded again next time",
                    path, err)
        if tmp_name and os.path.exists(tmp_name):
            os.unlink(tmp_name)


class ImageTreeTask(ImageClassificationTask):
    """Images in ``<split>/<class>/<image>`` inside a folder or a zip; label ids = sorted train classes.

    The folder listing is read (and validated) at construction, so ``label_names`` is known before
    any image is decoded; decoding happens on the first ``load_split`` and is cached."""

    cache_name: ClassVar[str]
    archive_name: ClassVar[str | None] = None
    """A zip to look for inside a ``data_dir`` folder."""
    eval_candidates: ClassVar[tuple[str, ...]] = ("test",)
    """Evaluation split folders, by preference."""

    def __init__(self, config: TaskConfig):
        super().__init__(config)
        self.source = _open_source(self.data_path(), self.archive_name)
        self.eval_split = self._find_eval_split()
        self._files = {"train": self._class_files("train")}
        self.label_names = list(self._files["train"])
        self._files[self.eval_split] = self._class_files(self.eval_split)

    @abstractmethod
    def data_path(self) -> Path:
        """The zip or folder named by ``task.data_dir`` (or the default location)."""

    def _find_eval_split(self) -> str:
        present = self.source.splits()
        for split in self.eval_candidates:
            if split in present:
                return split
        folders = ", ".join(f"{split}/" for split in self.eval_candidates)
        raise KDForgeError(f"{self.source.location} has no evaluation folder ({folders}) with <class>/ "
                           "image folders; add one beside train/")

    def _class_files(self, split: str) -> ClassFiles:
        where = self.source.location
        groups = self.source.class_files(split)
        if not groups:
            raise KDForgeError(f"{where} has no {split}/<class>/ image folders; expected train/<class>/"
                               f"*.jpg and {self.eval_split}/<class>/*.jpg")
        for label, files in groups.items():
            if not files:
                raise KDForgeError(f"class folder {split}/{label} in {where} has no images "
                                   f"({', '.join(IMAGE_EXTENSIONS)}); add images or remove the folder")
            if split != "train" and label not in self.label_names:
                raise KDForgeError(f"class folder {split}/{label} in {where} is not a train class "
                                   f"({', '.join(self.label_names)}); rename it or add train/{label}/")
        return groups

    def _names_and_labels(self, split: str) -> tuple[list[str], np.ndarray]:
        label_ids = {label: i for i, label in enumerate(self.label_names)}
        pairs = [(name, label_ids[label]) for label, files in self._files[split].items() for name in files]
        return [name for name, _ in pairs], np.array([label for _, label in pairs], dtype=np.int64)

    def _split_fingerprint(self, split: str, names: list[str]) -> str:
        key = {"version": _CACHE_VERSION, "data": self.source.fingerprint(names), "split": split,
               "classes": self.label_names}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]

    def _load_arrays(self, split: str) -> ImageArrayDataset:
        names, labels = self._names_and_labels(split)
        path = cache_dir() / self.cache_name / f"{split}-{self._split_fingerprint(split, names)}.npz"
        images = _load_cache(path, labels)
        if images is not None:
            return ImageArrayDataset(images, labels)
        images = _decode_images(self.source, names, desc=f"{self.name}: decoding {split}")
        _save_cache(path, images, labels)
        return ImageArrayDataset(images, labels)

    def fingerprint(self) -> str:
        """The config plus the data itself (a changed zip or folder gives a new fingerprint)."""
        parts = [super().fingerprint()]
        parts += [self._split_fingerprint(split, self._names_and_labels(split)[0]) for split in self._files]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


@TASKS.register("cifar10")
class Cifar10Task(ImageTreeTask):
    """CIFAR-10 (Krizhevsky, 2009): 50,000 train / 10,000 test 32x32 RGB images in 10 classes.

    ``task.data_dir``: ``cifar10-jpeg.zip``, a folder holding it, or the extracted folder; default
    ``cifar10/`` under the data roots (see :mod:`kdforge.paths`)."""

    cache_name = "cifar10"
    archive_name = "cifar10-jpeg.zip"
    eval_candidates = ("test",)
    mean = CIFAR10_MEAN
    std = CIFAR10_STD

    def data_path(self) -> Path:
        return resolve_data_path(self.config.data_dir, "cifar10")


@TASKS.register("image_folder")
class ImageFolderTask(ImageTreeTask):
    """Any ``train/<class>/`` + ``val/`` (or ``dev/``, ``test/``) image folder, or a zip of one.

    Images are read as RGB and must all have the same size; normalised with mean = std = 0.5."""

    cache_name = "image_folder"
    eval_candidates = ("val", "dev", "test")

    def data_path(self) -> Path:
        if not self.config.data_dir:
            raise KDForgeError("task image_folder needs `task.data_dir`: a folder (or zip) with "
                               "train/<class>/ and val/<class>/ images")
        return resolve_data_path(self.config.data_dir, "")


# --------------------------------------------------------------------------- digits


@TASKS.register("digits")
class DigitsTask(ImageClassificationTask):
    """scikit-learn's bundled handwritten digits (UCI optdigits test set): 1,797 8x8 grayscale images.

    A fixed stratified 80/20 split into "train" and "test" drawn with ``task.sample_seed``; pixel
    values 0..16 are scaled to 0..255 and images are ``(8, 8, 1)``. ``task.data_dir`` is not used."""

    eval_split = "test"
    in_channels = 1
    mean = (0.5,)
    std = (0.5,)
    hflip = False  # a mirrored digit is a different (or no) digit

    def __init__(self, config: TaskConfig):
        super().__init__(config)
        self.label_names = [str(digit) for digit in range(10)]

    def _load_arrays(self, split: str) -> ImageArrayDataset:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        images = np.rint(digits.images * (255 / 16)).astype(np.uint8)[..., None]
        labels = digits.target.astype(np.int64)
        train, test = train_test_split(np.arange(len(labels)), test_size=0.2, stratify=labels,
                                       random_state=self.config.sample_seed)
        keep = np.sort(train if split == "train" else test)
        return ImageArrayDataset(images[keep], labels[keep])
