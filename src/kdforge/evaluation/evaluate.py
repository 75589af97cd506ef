"""Measure one model on a task: official metrics, ECE, parameters, size on disk, latency."""

from __future__ import annotations

import torch

from kdforge.config import EvalConfig
from kdforge.evaluation.latency import image_inputs, model_latency, text_inputs
from kdforge.evaluation.report import ModelReport
from kdforge.evaluation.size import count_parameters, size_on_disk_mb
from kdforge.models.adapter import ModelAdapter
from kdforge.models.loading import LoadedModel


def latency_of(loaded: LoadedModel, task, sample: dict, config: EvalConfig) -> dict:
    if loaded.tokenizer is not None:
        embeddings = loaded.model.get_input_embeddings() if hasattr(loaded.model, "get_input_embeddings") else None
        rows = getattr(embeddings, "num_embeddings", None)
        make = lambda bs: text_inputs(loaded.tokenizer, bs, config.latency_seq_len, vocab_limit=rows)
    else:
        shape = tuple(sample["pixel_values"].shape[1:])
        make = lambda bs: image_inputs(bs, shape)
    return model_latency(loaded.model, make, config.latency_batch_sizes, config.latency_warmup,
                         config.latency_repeats, config.threads)


def evaluate_model(name: str, loaded: LoadedModel, task, data, config: EvalConfig,
                   device: str | torch.device = "cpu") -> ModelReport:
    collate = task.collator(loaded.tokenizer, train=False)
    scores = task.evaluate(ModelAdapter(loaded.model), data, collate, config.batch_size, device, config.ece_bins,
                           f"eval {name}")
    model_cpu = loaded.model.to("cpu")
    sample = collate([data[0]])
    return ModelReport(name=name, metrics=scores.metrics, main_metric=task.main_metric, ece=scores.ece,
                       params=count_parameters(model_cpu), size_mb=size_on_disk_mb(model_cpu),
                       latency=latency_of(loaded, task, sample, config), reliability=scores.reliability)
