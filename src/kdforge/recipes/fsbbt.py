"""FS-BBT: black-box few-shot knowledge distillation (Nguyen, Gupta, Do & Venkatesh, "Black-box Few-shot
Knowledge Distillation", ECCV 2022) as a stage: the data source ``fsbbt`` and the strategy ``soft_labels``.

The teacher is a black box (class probabilities only) and only a few unlabeled inputs are at hand: the
task's training split (labels ignored; ``task.train_limit`` sets how many). The data source grows them
into a synthetic set and buys the teacher's probabilities for all of it once, through the black box's
:class:`~kdforge.blackbox.query_cache.BudgetedTeacher` (cached, budgeted):

* images: the N originals; the MixUp pool (:func:`kdforge.fsbbt.mixup.mixup_pool`: ``copies`` x N pairs
  ``lam * x_a + (1 - lam) * x_b``, the near-original pairs dropped) when ``fsbbt.mixup``; and when
  ``fsbbt.cvae`` as many CVAE images (:mod:`kdforge.fsbbt.cvae`, trained on the originals conditioned on
  the teacher's argmax labels, hybrid latent sampling) as the pool dropped (``fsbbt.synthetic`` to
  choose; ``copies`` x N without the pool). Every image is stored as uint8 and labelled as stored.
* text: the N originals and, when ``fsbbt.mixup``, ``fsbbt.augment.copies`` TinyBERT variants of each
  (:mod:`kdforge.augment`, over the learner's input embeddings: the teacher's are not visible); no CVAE.

The labelled set is written to ``<output_dir>/stages/<stage>-fsbbt.npz`` (atomically, no pickle) with a
fingerprint of the task, the teacher's identity and the FS-BBT settings, so a resumed run reuses it
and sends no query. The ``soft_labels`` strategy trains the learner with the soft cross-entropy on the
bought probabilities (:func:`kdforge.fsbbt.soft_labels.soft_cross_entropy`)::

    L = -1/B * sum_i sum_k p_T(x_i)_k * log softmax(s(x_i))_k

with, for images, per-sample mixup of each batch's inputs and targets (:func:`kdforge.fsbbt.mixup.batch_mixup`,
``fsbbt.batch_mixup_alpha``) on top of the task's random crop and flip, as the authors' student training.
The flags ``fsbbt.mixup`` and ``fsbbt.cvae`` give the paper's ablations (soft labels only / + MixUp /
+ CVAE / both).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import PartialState
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveFloat, PositiveInt
from torch.utils.data import Dataset

from kdforge.augment import EmbeddingNeighbours, augment_dataset
from kdforge.blackbox.protocol import encode_image, encode_text
from kdforge.blackbox.teacher import BlackBoxModule
from kdforge.config import STUDENT, AugmentConfig, JobConfig, StageConfig
from kdforge.engine.step import TrainStep
from kdforge.errors import KDForgeError
from kdforge.fsbbt.cvae import generate, train_cvae
from kdforge.fsbbt.mixup import batch_mixup, mixup_pool
from kdforge.fsbbt.soft_labels import SoftLabelCollator, SoftLabelDataset, soft_cross_entropy, to_uint8_hwc
from kdforge.io import atomic_write_bytes
from kdforge.models.adapter import ModelAdapter
from kdforge.models.loading import LoadedModel, load_model
from kdforge.progress import Progress
from kdforge.recipes.base import DATA_SOURCES, STRATEGIES, DataSource, StageContext, StageData, Strategy
from kdforge.roles.base import capabilities
from kdforge.run_folder import RunFolder
from kdforge.tasks.base import ListDataset, Task

log = logging.getLogger("kdforge")

#: bump when the synthetic set is built differently, so stored sets are rebuilt
SYNTHETIC_VERSION = 1
#: FS-BBT settings that do not change the synthetic set (they act while training)
TRAINING_ONLY = {"batch_mixup", "batch_mixup_alpha"}


# ---------------------------------------------------------------------------- the stage's data


class FSBBTParams(BaseModel):
    """``fsbbt:`` (FS-BBT, Nguyen et al., ECCV 2022, black-box few-shot KD; ``data: fsbbt``): the task's few training
    inputs (labels ignored; ``task.train_limit`` sets how many) grown into a synthetic set that the
    black-box teacher labels once. Images: the originals, a MixUp pool of ``copies`` x N pairs (pairs with
    lambda <= threshold or >= 1 - threshold dropped) and CVAE images (as many as the pool dropped).
    Text: the originals and ``augment.copies`` TinyBERT variants of each. Defaults: the authors' code
    (kdforge.fsbbt.mixup, kdforge.fsbbt.cvae)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    mixup: bool = Field(True, description="images: the MixUp pool; text: the TinyBERT-augmented copies")
    cvae: bool = Field(True, description="images: CVAE images (trained on the originals with the teacher's "
                       "argmax labels); text: not used")
    copies: PositiveInt = Field(20, description="MixUp pairs per original image (paper: 20 on CIFAR-10)")
    mixup_alpha: PositiveFloat = Field(1.0, description="lambda ~ Beta(alpha, alpha) of the pool (paper: 1)")
    threshold: float = Field(0.05, ge=0, lt=0.5, description="pairs with lambda <= threshold or >= 1 - threshold "
                             "are dropped (rounded to 2 decimals; paper: 0.05)")
    synthetic: NonNegativeInt | None = Field(None, description="CVAE images; default: as many as the MixUp pool "
                                             "dropped, or copies x N without the pool")
    cvae_epochs: PositiveInt = Field(600, description="paper: 600 on CIFAR-10")
    cvae_batch_size: PositiveInt = 64
    cvae_lr: PositiveFloat = 1e-3
    latent_dim: PositiveInt = Field(2, description="paper: 2")
    batch_mixup: bool = Field(True, description="soft_labels strategy: mixup of each image batch (inputs and "
                              "targets); off for text")
    batch_mixup_alpha: PositiveFloat = Field(1.0, description="lambda_i ~ Beta(alpha, alpha) per sample (paper: 1)")
    augment: AugmentConfig = Field(default_factory=AugmentConfig, description="text: the TinyBERT augmentation, "
                                   "over the student's input embeddings")
    seed: int = 0


class WithSoftLabels:
    """A collator plus ``soft_labels`` ``(B, K)``: the stacked ``soft_labels`` of the examples (text)."""

    def __init__(self, collate_fn):
        self.collate_fn = collate_fn

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collate_fn(examples)
        batch["soft_labels"] = torch.stack([torch.as_tensor(e["soft_labels"], dtype=torch.float32) for e in examples])
        return batch


# ---------------------------------------------------------------------------- building the synthetic set


def synthetic_fingerprint(spec: FSBBTParams, task: Task, teacher: BlackBoxModule, learner_model: str | None) -> str:
    """What the synthetic set depends on: the task's data, the teacher, the FS-BBT settings (and for text
    the learner whose embeddings give the word neighbours)."""
    blob = json.dumps({"version": SYNTHETIC_VERSION, "task": task.fingerprint(), "teacher": teacher.teacher.identity,
                       "fsbbt": spec.model_dump(mode="json", exclude=TRAINING_ONLY),
                       "learner": learner_model if task.modality == "text" else None}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def label_images(teacher: BlackBoxModule, images: torch.Tensor) -> np.ndarray:
    """The teacher's probabilities of ``uint8 (N, H, W, C)`` images (sent as ``(C, H, W)``)."""
    return teacher.teacher.predict([encode_image(image.permute(2, 0, 1).numpy()) for image in images])


def build_images(spec: FSBBTParams, task: Task, teacher: BlackBoxModule, device) -> dict[str, Any]:
    """Originals + MixUp pool + CVAE images (module docstring), each labelled by the teacher."""
    train = task.split("train")
    originals = torch.stack([train[i]["image"] for i in range(len(train))])
    x = originals.permute(0, 3, 1, 2).float() / 255
    generator = torch.Generator().manual_seed(spec.seed)
    probs = [label_images(teacher, originals)]
    parts, dropped = [originals], 0
    if spec.mixup:
        mixed, dropped = mixup_pool(x, spec.copies, generator, spec.threshold, 1 - spec.threshold,
                                    alpha=spec.mixup_alpha)
        parts.append(to_uint8_hwc(mixed))
    count = 0
    if spec.cvae:
        count = spec.synthetic if spec.synthetic is not None else dropped if spec.mixup else spec.copies * len(x)
    if count:
        log.info("FS-BBT: training the CVAE on %d images (%d epochs) for %d synthetic images", len(x),
                 spec.cvae_epochs, count)
        argmax = torch.from_numpy(probs[0].argmax(1))
        cvae = train_cvae(x, argmax, task.num_labels, spec.cvae_epochs, spec.cvae_batch_size, spec.cvae_lr,
                          spec.seed, spec.latent_dim, device)
        parts.append(to_uint8_hwc(generate(cvae, count, task.num_labels, generator)[0]))
    images = torch.cat(parts)
    probs.append(label_images(teacher, images[len(originals):]))
    counts = [len(originals), len(parts[1]) if spec.mixup else 0, count]
    return {"images": images.numpy(), "probs": np.concatenate(probs), "counts": np.asarray(counts, dtype=np.int64)}


def learner_model(config: JobConfig, stage: StageConfig) -> str:
    spec = config.student if stage.learner == STUDENT else config.assistants[stage.learner]
    if spec is None or spec.model is None:
        key = "student" if stage.learner == STUDENT else f"assistants.{stage.learner}"
        raise KDForgeError(f"stage {stage.name!r}: FS-BBT on text augments with the learner's embeddings; give the "
                           f"learner a model of its own ({key}.model)")
    return spec.model


def build_texts(spec: FSBBTParams, task: Task, teacher: LoadedModel, learner: LoadedModel) -> dict[str, Any]:
    """Originals + TinyBERT variants (over the learner's input embeddings), each labelled by the teacher."""
    train = task.split("train")
    data = [train[i] for i in range(len(train))]
    if spec.mixup:
        aug = spec.augment
        embeddings = learner.model.get_input_embeddings().weight.detach()
        data = list(augment_dataset(train, EmbeddingNeighbours(teacher.tokenizer, embeddings, aug.k), aug.copies,
                                    aug.p, aug.seed))
    texts = [[e["text_a"], e.get("text_b")] for e in data]
    probs = teacher.model.teacher.predict([encode_text(a, b) for a, b in texts])
    counts = [len(train), len(data) - len(train), 0]
    return {"texts": np.asarray(json.dumps(texts)), "probs": probs, "counts": np.asarray(counts, dtype=np.int64)}


def save_synthetic(path: Path, arrays: dict[str, Any], fingerprint: str) -> None:
    """``arrays`` and the fingerprint as one ``.npz``, written atomically (no pickled objects)."""
    buffer = io.BytesIO()
    np.savez(buffer, fingerprint=np.asarray(fingerprint), **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def load_synthetic(path: Path, fingerprint: str) -> dict[str, np.ndarray] | None:
    """The stored set when ``path`` holds one with this fingerprint, else None (logged)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as stored:
            arrays = {key: stored[key] for key in stored.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        log.warning("FS-BBT: %s is unreadable (%s); building the synthetic set again (cached answers are reused)",
                    path, err)
        return None
    if str(arrays.get("fingerprint")) != fingerprint:
        log.info("FS-BBT: %s was built with other settings; building the synthetic set again", path)
        return None
    return arrays


def synthetic_dataset(arrays: dict[str, np.ndarray]) -> Dataset:
    probs = torch.from_numpy(arrays["probs"].astype(np.float32))
    if "images" in arrays:
        return SoftLabelDataset(torch.from_numpy(arrays["images"]), probs)
    texts = json.loads(str(arrays["texts"]))
    return ListDataset([{"text_a": a, "text_b": b, "label": int(p.argmax()), "soft_labels": p}
                        for (a, b), p in zip(texts, probs, strict=True)])


def soft_label_collator(task: Task):
    """The collator of the synthetic set: the task's, plus the stacked ``soft_labels`` when training."""

    def collator(tokenizer: Any = None, train: bool = False):
        collate = task.collator(tokenizer, train)
        if not train:
            return collate
        if task.modality == "image":
            return SoftLabelCollator(collate.mean, collate.std, augment=collate.augment, hflip=collate.hflip)
        return WithSoftLabels(collate)

    return collator


def fsbbt_data(spec: FSBBTParams, stage: StageConfig, task: Task, teacher: LoadedModel | None, config: JobConfig,
               device) -> StageData:
    """The ``fsbbt`` data source's data: the stored synthetic set of this stage, else built and stored now."""
    if teacher is None or not capabilities(config, config.stage_teachers(stage)[0]).queried:
        raise KDForgeError(f"stage {stage.name!r}: `data: fsbbt` is labelled by a black-box teacher; make the stage's "
                           "first teacher a `black_box:` one")
    if not task.problem.classes:
        raise KDForgeError(f"stage {stage.name!r}: FS-BBT distils class probabilities; task {task.name} is "
                           f"{task.problem_type}")
    module: BlackBoxModule = teacher.model
    learner = learner_model(config, stage) if task.modality == "text" else None
    fingerprint = synthetic_fingerprint(spec, task, module, learner)
    path = RunFolder.of(config).fsbbt_set(stage.name)
    with PartialState().main_process_first():
        arrays = load_synthetic(path, fingerprint)
        if arrays is not None:
            log.info("stage %s: FS-BBT set reused from %s (no query)", stage.name, path)
        else:
            before = module.teacher.queries
            if task.modality == "image":
                arrays = build_images(spec, task, module, device)
            else:
                arrays = build_texts(spec, task, teacher, load_model(learner, task, "student.model"))
            if PartialState().is_main_process:
                save_synthetic(path, arrays, fingerprint)
            log.info("stage %s: FS-BBT set labelled by the black box (%d new queries), stored in %s", stage.name,
                     module.teacher.queries - before, path)
    counts = dict(zip(("originals", "mixup" if task.modality == "image" else "augmented", "cvae"),
                      (int(n) for n in arrays["counts"]), strict=True))
    log.info("stage %s: FS-BBT set of %d inputs: %s", stage.name, int(sum(counts.values())),
             ", ".join(f"{n} {kind}" for kind, n in counts.items()))
    mixup = spec.batch_mixup_alpha if spec.batch_mixup and task.modality == "image" else None
    return StageData(task.name, synthetic_dataset(arrays), soft_label_collator(task),
                     f"{task.fingerprint()}-fsbbt-{fingerprint}", FSBBT.carries,
                     selection=task.split(task.selection_split), selection_split=task.selection_split, scorer=task,
                     num_labels=task.num_labels, label_names=list(task.label_names),
                     random_train_inputs=task.random_train_inputs, mixup_alpha=mixup, info={"counts": counts})


@DATA_SOURCES.register("fsbbt")
class FSBBT(DataSource):
    """``data: fsbbt``: the synthetic set (:func:`fsbbt_data`); its training batches carry the bought
    ``soft_labels``; the learner is scored on the task's selection split."""

    Params = FSBBTParams
    carries = frozenset({"labels", "soft_labels"})
    learns_task = True

    def check(self, config: JobConfig, stage: StageConfig, index: int) -> None:
        roles = config.stage_teachers(stage)
        first = config.teacher_configs().get(roles[0]) if roles else None
        if first is None or first.black_box is None:
            raise KDForgeError(f"stages.{index}: `data: fsbbt` is labelled by a black-box teacher, but the stage's "
                               f"first teacher ({roles[0] if roles else 'none'}) is not one; give it a `black_box:` "
                               "section (url, file or callable)")

    def build(self, stage: StageConfig, task: Task, teacher: LoadedModel | None, config: JobConfig,
              device) -> StageData:
        return fsbbt_data(self.params, stage, task, teacher, config, device)


# ---------------------------------------------------------------------------- the soft_labels strategy


class SoftLabelStep(TrainStep):
    """The learner trained with the soft cross-entropy on ``batch["soft_labels"]``; with ``mixup_alpha``, each
    batch's ``pixel_values`` and targets are first mixed per sample (global torch RNG: checkpointed)."""

    def __init__(self, learner: ModelAdapter, mixup_alpha: float | None = None):
        super().__init__()
        self.learner = learner
        self.mixup_alpha = mixup_alpha

    def forward(self, batch: dict[str, Any], progress: Progress) -> tuple[torch.Tensor, dict[str, float]]:
        targets = batch["soft_labels"].float()
        if self.mixup_alpha is not None:
            pixels, targets = batch_mixup(batch["pixel_values"], targets, self.mixup_alpha)
            batch = {**batch, "pixel_values": pixels}
        loss = soft_cross_entropy(self.learner(batch).logits.float(), targets)
        return loss, {"soft_ce": float(loss.detach())}


@STRATEGIES.register("soft_labels")
class SoftLabels(Strategy):
    """FS-BBT's student training: soft cross-entropy on the probabilities the ``fsbbt`` data source bought
    (with the per-sample batch mixup that source asks for)."""

    needs = frozenset({"soft_labels"})

    def check(self, config: JobConfig, stage: StageConfig) -> None:
        if stage.objectives:
            raise KDForgeError(f"stage {stage.name!r}: strategy soft_labels trains with the soft cross-entropy on the "
                               "teacher's probabilities and takes no objectives; set the stage's objectives: []")

    def build(self, ctx: StageContext) -> SoftLabelStep:
        return SoftLabelStep(ctx.adapter(ctx.learner), ctx.data.mixup_alpha)
