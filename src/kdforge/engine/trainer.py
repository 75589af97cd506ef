"""The training loop, shared by fine-tuning and every distillation strategy.

It trains a :class:`kdforge.engine.step.TrainStep` (the strategy's seam: the loss of a batch, the
learner to evaluate) and knows nothing of objectives or roles.

Built on HF Accelerate (devices, DDP with gloo on CPU / nccl on GPU via ``accelerate launch`` or
``torchrun``, mixed precision). It adds what a distillation run needs: AdamW (or SGD,
``train.optimizer``) with linear warm-up and decay, gradient accumulation, evaluation each epoch with the
best epoch kept, atomic checkpoints with exact ``resume``, progress bars (or log lines when output is not a terminal)
and experiment tracking through Accelerate's trackers (``train.trackers``: TensorBoard scalars in
``tensorboard/<desc>`` by default, MLflow, W&B...; :mod:`kdforge.engine.tracking`), one tracked run per
``fit``, closed when it ends or fails.

Reliability rules:

* A non-finite loss stops training at the micro-batch where it appears, before its backward pass,
  with one :class:`KDForgeError` line (step, loss terms, likely causes); no checkpoint is written
  after it, and weights are checked to be finite before every checkpoint, so ``checkpoints/<desc>/last``
  stays the last good state and ``resume`` starts from it.
* A checkpoint is written when training ends, so ``fit(resume=True)`` on a finished run restores
  it and returns without an optimizer step. ``fit`` never deletes its checkpoints: the job that
  owns the run calls :meth:`Trainer.remove_checkpoints` (or :func:`kdforge.engine.checkpoint.remove_checkpoints`)
  once the run's outputs (export, metrics, report) are written.
* With several processes, only the main process evaluates (the whole split) and sends its scores
  to the others: every process logs, compares and keeps the same number and the same best epoch.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import broadcast_object_list
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from kdforge.config import TrainConfig
from kdforge.engine import checkpoint as ckpt
from kdforge.engine.batching import batches_per_epoch, epoch_batches
from kdforge.engine.step import TrainStep
from kdforge.engine.tracking import end_tracking, resolve_trackers, start_tracking
from kdforge.errors import KDForgeError
from kdforge.progress import Progress
from kdforge.run_folder import RunFolder

log = logging.getLogger("kdforge")

#: evaluate(learner) -> {metric: value}
Evaluate = Callable[[torch.nn.Module], dict[str, float]]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_accelerator(config: TrainConfig) -> Accelerator:
    return Accelerator(cpu=config.device == "cpu", mixed_precision=config.mixed_precision,
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])


@dataclass
class TrainState:
    """Counters and history saved in every checkpoint."""

    epoch: int = 0
    batches_done: int = 0  # micro-batches of the current epoch already consumed
    step: int = 0  # optimizer steps
    loss_sum: float = 0.0
    loss_count: int = 0
    term_sums: dict[str, float] = field(default_factory=dict)  # each loss term's sum over the epoch's micro-batches
    best_metric: float | None = None
    best_epoch: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


def param_groups(module: torch.nn.Module, weight_decay: float, lr_by_part: Mapping[str, float] | None = None,
                 parts: Mapping[str, torch.nn.Module] | None = None) -> list[dict]:
    """Optimizer groups: no weight decay on biases and normalisation weights. The parameters of each of
    ``parts`` named in ``lr_by_part`` form groups of their own with that learning rate (after the
    default groups, which keep the optimizer's)."""
    own = {id(p): name for name, part in (parts or {}).items() if name in (lr_by_part or {})
           for p in part.parameters()}
    groups: dict[str | None, tuple[list, list]] = {None: ([], [])}
    for name, p in module.named_parameters():
        if p.requires_grad:
            decay, no_decay = groups.setdefault(own.get(id(p)), ([], []))
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    out = []
    for part, (decay, no_decay) in groups.items():
        lr = {} if part is None else {"lr": lr_by_part[part]}
        out += [{"params": decay, "weight_decay": weight_decay, **lr}, {"params": no_decay, "weight_decay": 0.0, **lr}]
    return out


def check_parts(lr_by_part: Mapping[str, float], parts: Mapping[str, torch.nn.Module], desc: str) -> None:
    """Every name of ``train.lr_by_role`` is a trainable part of the step (one line naming it, else)."""
    unknown = [name for name in lr_by_part if name not in parts]
    if unknown:
        raise KDForgeError(f"train.lr_by_role: {unknown[0]!r} is not a trained part of {desc} (its parts: "
                           f"{', '.join(parts) or 'none'}); give the stage's own rates in its `train:` overrides "
                           "(stages.N.train.lr_by_role)")


def make_optimizer(groups: list[dict], config: TrainConfig) -> torch.optim.Optimizer:
    """``train.optimizer``: AdamW (decoupled weight decay), or SGD with ``train.momentum`` (L2 weight decay
    added to the gradient, as the CIFAR KD papers train)."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)
    return torch.optim.AdamW(groups, lr=config.lr)


def linear_warmup_decay(optimizer: torch.optim.Optimizer, warmup: int, total: int, shape: str = "linear"):
    """The learning-rate factor: a linear warm-up over ``warmup`` steps, then ``shape``: linear decay to 0 at
    ``total``, half a cosine down to 0 (cosine), or 1 throughout (constant)."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if shape == "constant":
            return 1.0
        left = max(0.0, (total - step) / max(1, total - warmup))  # 1 -> 0 after the warm-up
        return 0.5 * (1 - math.cos(math.pi * left)) if shape == "cosine" else left

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Trainer:
    """Trains ``step`` on ``train_data``; ``fit()`` returns the final :class:`TrainState`."""

    def __init__(self, step: TrainStep, train_data: Dataset, collate_fn: Callable,
                 config: TrainConfig, run_dir: str | Path, evaluate: Evaluate | None = None,
                 main_metric: str | None = None, greater_is_better: bool = True,
                 callbacks: Sequence[Callable[[Trainer], None]] = (), accelerator: Accelerator | None = None,
                 desc: str = "train"):
        self.config = config
        self.run_dir = Path(run_dir)
        self.evaluate = evaluate
        self.main_metric = main_metric
        self.greater_is_better = greater_is_better
        self.callbacks = list(callbacks)
        self.desc = desc
        self.train_data = train_data
        self.collate_fn = collate_fn
        self.accelerator = accelerator or make_accelerator(config)
        self.state = TrainState()
        self.ckpt_root = RunFolder(self.run_dir).checkpoints(desc)
        self.ckpt_dir = self.ckpt_root / "last"
        self.best_path = self.ckpt_root / "best-student.pt"
        self.checkpoint_step: int | None = None  # the step of the newest checkpoint written or restored
        resolve_trackers(config.trackers)  # an unknown or uninstalled tracker: one line, before training

        acc = self.accelerator
        self.world, self.rank = acc.num_processes, acc.process_index
        if len(train_data) == 0:
            raise KDForgeError("the training split is empty; check `task.data_dir` and `task.train_limit`")
        n_batches = batches_per_epoch(len(train_data), config.batch_size, self.world, config.drop_last)
        if n_batches == 0:
            raise KDForgeError(f"train.drop_last: the training split has {len(train_data)} rows, fewer than one batch "
                               f"of {config.batch_size}; lower the batch size or keep the last batch")
        self.steps_per_epoch = math.ceil(n_batches / config.grad_accum)
        self.total_steps = config.epochs * self.steps_per_epoch
        if config.max_steps:
            self.total_steps = min(self.total_steps, config.max_steps)
        optimizer = make_optimizer(param_groups(step, config.weight_decay, config.lr_by_role, step.parts()), config)
        step.to(memory_format=torch.channels_last)  # convolutions: 1.2-1.3x faster on CPU; no-op for 2-D weights
        self.scheduler = linear_warmup_decay(optimizer, int(config.warmup_ratio * self.total_steps),
                                             self.total_steps, config.scheduler)
        self.model, self.optimizer = acc.prepare(step, optimizer)
        self.unwrapped: TrainStep = acc.unwrap_model(self.model)

    # ------------------------------------------------------------------ helpers
    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def progress(self) -> Progress:
        return Progress(step=self.state.step, total_steps=self.total_steps,
                        epoch=self.state.epoch + self.state.batches_done / max(1, self.steps_per_epoch
                                                                                 * self.config.grad_accum))

    def _track(self, tag: str, values: dict[str, Any]) -> None:
        """Log the finite numbers of ``values`` as ``<tag>/<key>`` at the current optimizer step to this
        fit's trackers (main process only; nothing when ``train.trackers`` is empty)."""
        finite = {f"{tag}/{k}": v for k, v in values.items()
                  if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}
        if finite and self.accelerator.trackers:
            self.accelerator.log(finite, step=self.state.step)

    def _tracked_params(self) -> dict[str, Any]:
        return {**self.config.model_dump(), "desc": self.desc, "main_metric": self.main_metric,
                "total_steps": self.total_steps, "processes": self.world}

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> None:
        acc = self.accelerator
        self._check_finite_weights()
        staging = ckpt.staging_dir(self.ckpt_dir)
        if self.is_main:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        acc.wait_for_everyone()
        ckpt.save_rng(staging, self.rank)
        if self.is_main:  # tensors and plain values only: loads with weights_only=True
            ckpt.save_state(staging, {"module": self.unwrapped.checkpoint_state(),
                                      "optimizer": self.optimizer.state_dict(),
                                      "scheduler": self.scheduler.state_dict()})
        acc.wait_for_everyone()
        if self.is_main:
            ckpt.finish(staging, self.world, vars(self.state))  # counters and history as JSON
            ckpt.publish_checkpoint(self.ckpt_dir)  # the replaced checkpoint is kept as `previous`
        acc.wait_for_everyone()
        self.checkpoint_step = self.state.step

    def remove_checkpoints(self) -> None:
        """Delete this trainer's checkpoints (``checkpoints/<desc>``), unless ``train.keep_checkpoint``;
        for the owner of the run to call once its outputs are complete (``fit`` keeps them)."""
        self.accelerator.wait_for_everyone()
        if self.is_main and not self.config.keep_checkpoint:
            ckpt.remove_checkpoints(self.ckpt_root)

    def load_checkpoint(self) -> bool:
        # `last`, or `previous` when a file of `last` is truncated or corrupt (reported)
        saved = ckpt.read_checkpoint(self.ckpt_dir, self.rank, self.world)
        if saved is None:
            return False
        missing, unexpected = self.unwrapped.load_state_dict(saved.state["module"], strict=False)
        if unexpected or any(not TrainStep.is_frozen_key(k) for k in missing):
            raise KDForgeError(f"checkpoint {saved.folder} does not match this job's models; "
                               "resume with the same config, or start without --resume")
        self.optimizer.load_state_dict(saved.state["optimizer"])
        self.scheduler.load_state_dict(saved.state["scheduler"])
        self.state = TrainState(**saved.trainer)
        self.checkpoint_step = self.state.step
        ckpt.set_rng_state(saved.rng)
        log.info("resumed from %s at step %d (epoch %d, batch %d)", saved.folder, self.state.step,
                 self.state.epoch + 1, self.state.batches_done)
        return True

    # ------------------------------------------------------------------ evaluation
    def _end_epoch(self) -> None:
        s = self.state
        names = sorted(s.term_sums)
        loss_sum, loss_count, term_sums = s.loss_sum, s.loss_count, [s.term_sums[n] for n in names]
        if self.world > 1:  # the mean over every process's micro-batches: the same history everywhere
            totals = self.accelerator.reduce(torch.tensor([loss_sum, float(loss_count), *term_sums],
                                                          dtype=torch.float64, device=self.accelerator.device), "sum")
            loss_sum, loss_count, term_sums = float(totals[0]), int(totals[1]), totals[2:].tolist()
        entry: dict[str, Any] = {"epoch": s.epoch + 1, "step": s.step, "loss": loss_sum / max(1, loss_count)}
        if len(names) > 1:  # the loss terms' epoch means (one term is the loss itself)
            entry.update({f"loss:{n}": total / max(1, loss_count) for n, total in zip(names, term_sums, strict=True)})
        if self.evaluate is not None:
            metrics = self._evaluate()
            entry.update(metrics)
            self._track("eval", metrics)
            value = metrics.get(self.main_metric) if self.main_metric else None
            better = value is not None and (s.best_metric is None or (
                value > s.best_metric if self.greater_is_better else value < s.best_metric))
            if better:
                s.best_metric, s.best_epoch = value, s.epoch + 1
                if self.config.select_best and self.is_main:
                    ckpt.save_torch_atomic(self.unwrapped.learner.state_dict(), self.best_path)
            log.info("%s epoch %d/%d: %s", self.desc, s.epoch + 1, self.config.epochs,
                     ", ".join(f"{k} {v:.4f}" for k, v in entry.items() if isinstance(v, float)))
        self._track("train", {"epoch_loss": entry["loss"]})  # the history's mean loss of the epoch
        s.history.append(entry)
        s.epoch += 1
        s.batches_done, s.loss_sum, s.loss_count, s.term_sums = 0, 0.0, 0, {}

    def _evaluate(self) -> dict[str, float]:
        """The learner's scores on the whole evaluation split, computed by the main process and sent
        to the others, so that every process keeps the same number and picks the same best epoch."""
        metrics = self.evaluate(self.unwrapped.learner) if self.is_main or self.world == 1 else None
        self.model.train()
        if self.world > 1:
            metrics = broadcast_object_list([metrics], from_process=0)[0]
        return metrics

    # ------------------------------------------------------------------ non-finite values
    def _check_finite_loss(self, loss: torch.Tensor, terms: dict[str, Any], micro_batch: int,
                           n_batches: int) -> None:
        """Stop at the first non-finite loss (on any process), before its backward pass and before any
        checkpoint of the state it would produce."""
        finite = torch.isfinite(loss.detach()).all()
        if self.world > 1:  # every process stops at the same micro-batch
            flags = self.accelerator.gather(finite.float().reshape(1).to(self.accelerator.device))
            bad_ranks = [r for r, ok in enumerate(flags.tolist()) if not ok]
        else:
            bad_ranks = [] if finite else [self.rank]
        if not bad_ranks:
            return
        s = self.state
        where = f" on process {bad_ranks[0]}" if self.world > 1 else ""
        shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, int | float) else f"{k} {v}" for k, v in terms.items())
        if self.rank not in bad_ranks:
            shown = f"finite here, non-finite on process {bad_ranks[0]}"
        kept = (f"the last good checkpoint, {self.ckpt_dir} (step {self.checkpoint_step}), is kept and --resume "
                "starts from it") if self.checkpoint_step is not None else "no checkpoint was written before it"
        raise KDForgeError(
            f"non-finite training loss ({float(loss.detach().float()):.4g}) at optimizer step {s.step + 1} "
            f"(epoch {s.epoch + 1}, micro-batch {micro_batch} of {n_batches}){where} in {self.desc}; loss terms: "
            f"{shown or 'none reported'}; likely causes: a learning rate too high (train.lr {self.config.lr:g}), "
            "a temperature too small or a loss weight (or weight schedule) too large in `objectives`, or "
            f"non-finite input values; {kept}")

    def _check_finite_weights(self) -> None:
        """Refuse to checkpoint non-finite weights (a finite loss can still give an infinite update)."""
        bad = [k for k, v in self.unwrapped.checkpoint_state().items()
               if torch.is_floating_point(v) and not torch.isfinite(v).all()]
        if self.world > 1:  # buffers may differ between processes: all of them refuse, or none
            flags = self.accelerator.gather(torch.tensor([float(not bad)], device=self.accelerator.device))
            if not bad and not flags.all():
                bad = [f"on process {flags.tolist().index(0.0)}"]
        if bad:
            kept = f"{self.ckpt_dir} (step {self.checkpoint_step})" if self.checkpoint_step is not None else "none"
            raise KDForgeError(
                f"non-finite weights after optimizer step {self.state.step} in {self.desc} ({', '.join(bad[:3])}"
                f"{', ...' if len(bad) > 3 else ''}) although the loss was finite: an exploding update; likely "
                "causes: a learning rate too high (train.lr) or no gradient clipping (train.max_grad_norm); "
                f"not checkpointed: the last good checkpoint is {kept}")

    # ------------------------------------------------------------------ loop
    def fit(self, resume: bool = False) -> TrainState:
        cfg, acc = self.config, self.accelerator
        if resume:
            if not self.load_checkpoint():
                log.info("no checkpoint in %s: starting from the beginning", self.ckpt_dir)
        interactive = sys.stderr.isatty()
        if self.finished:
            log.info("%s: trained to step %d of %d already (checkpoint %s): nothing left to train", self.desc,
                     self.state.step, self.total_steps, self.ckpt_dir)
        else:
            log.info("%s: %d optimizer steps (%d per epoch), device %s, processes: %d", self.desc,
                     self.total_steps, self.steps_per_epoch, self.accelerator.device, self.world)
        self._started, self._start_step = time.monotonic(), self.state.step
        if not self.finished:  # a resumed finished run logs nothing: no empty tracked run
            start_tracking(acc, cfg.trackers, self.run_dir, self.desc, self._tracked_params())
        bar = tqdm(total=self.total_steps, initial=self.state.step, desc=self.desc, unit="step",
                   disable=not (self.is_main and interactive), dynamic_ncols=True)
        self.model.train()
        failed = True
        try:
            while not self.finished:
                self._run_epoch(bar, interactive)
            failed = False
        finally:
            bar.close()
            end_tracking(acc, failed)  # also on error: the next fit in this process starts its own run
        acc.wait_for_everyone()  # the main process has written best-student.pt
        self.unwrapped.to(memory_format=torch.contiguous_format)  # saved and exported in the usual layout
        if cfg.select_best and self.state.best_epoch is not None and self.best_path.is_file():
            self.unwrapped.learner.load_state_dict(ckpt.load(self.best_path))
            log.info("%s: kept epoch %d (best %s %.4f)", self.desc, self.state.best_epoch, self.main_metric,
                     self.state.best_metric)
        acc.wait_for_everyone()
        return self.state

    @property
    def finished(self) -> bool:
        return self.state.epoch >= self.config.epochs or self.state.step >= self.total_steps

    def _loader(self) -> DataLoader:
        cfg, s = self.config, self.state
        batches = epoch_batches(len(self.train_data), cfg.batch_size, cfg.seed, s.epoch, self.rank, self.world,
                                cfg.shuffle, cfg.drop_last)
        # an own generator: creating a DataLoader iterator must not draw from the global RNG, whose
        # state (dropout) is checkpointed and restored on resume
        return DataLoader(self.train_data, batch_sampler=batches[s.batches_done:], collate_fn=self.collate_fn,
                          generator=torch.Generator())

    def _run_epoch(self, bar: tqdm, interactive: bool) -> None:
        cfg, acc, s = self.config, self.accelerator, self.state
        n_batches = batches_per_epoch(len(self.train_data), cfg.batch_size, self.world, cfg.drop_last)
        for batch in self._loader():
            batch = {k: v.to(acc.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            progress = self.progress()  # where training is when this batch starts (its epoch's number)
            s.batches_done += 1
            sync = s.batches_done % cfg.grad_accum == 0 or s.batches_done == n_batches
            context = acc.no_sync(self.model) if not sync else contextlib.nullcontext()
            with context, acc.autocast():
                loss, terms = self.model(batch, progress)
                self._check_finite_loss(loss, terms, s.batches_done, n_batches)
                acc.backward(loss / cfg.grad_accum)
            loss = loss.detach()
            s.loss_sum += float(loss)
            s.loss_count += 1
            for name, value in terms.items():
                if isinstance(value, int | float):
                    s.term_sums[name] = s.term_sums.get(name, 0.0) + float(value)
            if not sync:
                continue
            if cfg.max_grad_norm:
                acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            s.step += 1
            self.unwrapped.after_step(self.progress())
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss):.4f}", epoch=s.epoch + 1, refresh=False)
            if s.step % cfg.log_every == 0 or s.step == self.total_steps:
                lr = self.scheduler.get_last_lr()[0]
                self._track("train", {"loss": float(loss), "lr": lr, **terms})
                if not interactive and self.is_main:
                    elapsed = time.monotonic() - self._started
                    done = s.step - self._start_step
                    eta = elapsed / max(1, done) * (self.total_steps - s.step)
                    log.info("%s step %d/%d epoch %d loss %.4f lr %.2e elapsed %.0fs eta %.0fs", self.desc,
                             s.step, self.total_steps, s.epoch + 1, float(loss), lr, elapsed, eta)
            end_of_epoch = s.batches_done == n_batches
            if end_of_epoch or s.step >= self.total_steps:
                self._end_epoch()
            if (cfg.checkpoint_every and s.step % cfg.checkpoint_every == 0) or end_of_epoch or self.finished:
                self.save_checkpoint()  # also when training ends: a resumed finished run trains no step
            for callback in self.callbacks:
                callback(self)
            if s.step >= self.total_steps:
                return
