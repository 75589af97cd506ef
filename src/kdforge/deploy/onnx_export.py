"""Export a kdforge model (an HF sequence classifier or a built-in vision net) to one ONNX file.

Which exporter. ``torch.onnx.export(..., dynamo=True)``, the ``torch.export``-based exporter (the
default since PyTorch 2.9), not the legacy TorchScript tracer. The tracer records one run of the
Python code, so data-dependent branches are frozen at export time (its TracerWarning "Converting a
tensor to a Python boolean might cause the trace to be incorrect" fires inside transformers 5's
attention-mask code): a tiny BERT traced with an all-ones example mask ignored padding afterwards,
its logits off by 1e-2 on padded batches. ``torch.export`` captures the whole graph with symbolic
batch / sequence sizes and refuses what it cannot capture soundly; the same model matches PyTorch to
1e-8 at other batch sizes and sequence lengths, padded or not (tests/test_onnx_export.py). It also
exports the SPS students (kdforge.models.sps, layers re-run through ``torch.func.functional_call``).

What the file holds. Text models: int64 inputs named as the tokenizer's ``model_input_names``
among ``input_ids`` / ``attention_mask`` / ``token_type_ids`` (those the model's ``forward``
takes), with dynamic axes ``batch`` and ``sequence``; vision nets: a float32 ``pixel_values``
``(batch, C, height, width)`` with dynamic batch, height and width (the nets end in global average
pooling). One float32 output ``logits`` ``(batch, num_labels)``. The weights are stored inside the
file (no external-data files; protobuf caps that at 2 GB), which is written atomically.
"""

from __future__ import annotations

import inspect
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from kdforge.errors import KDForgeError
from kdforge.io import atomic_write_bytes
from kdforge.models.loading import LoadedModel

#: the text inputs an exported model may take, in the order of the ONNX graph's inputs
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
#: protobuf's limit on one serialised message: a larger model would need external-data files
MAX_SINGLE_FILE_BYTES = 2**31 - 2**24
#: batch size of the example input; torch.export specialises sizes 0 and 1, so it must be >= 2
EXAMPLE_BATCH = 2


class _TextLogits(nn.Module):
    """``logits`` of an HF sequence classifier from plain tensors (the exporter needs tensors out)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        extra = {"attention_mask": attention_mask, "token_type_ids": token_type_ids}
        return self.model(input_ids=input_ids, return_dict=True,
                          **{k: v for k, v in extra.items() if v is not None}).logits


def _model_name(loaded: LoadedModel) -> str:
    return type(loaded.model).__name__ + (f" ({loaded.source})" if loaded.source else "")


def text_input_names(loaded: LoadedModel) -> list[str]:
    """The ONNX inputs of a text model: the tokenizer's ``model_input_names`` (all three when there is
    no tokenizer) that the model's ``forward`` accepts, ``input_ids`` always among them."""
    wanted = getattr(loaded.tokenizer, "model_input_names", None) or TEXT_INPUTS
    accepted = inspect.signature(loaded.model.forward).parameters
    return [name for name in TEXT_INPUTS if name == "input_ids" or (name in wanted and name in accepted)]


def text_example(loaded: LoadedModel, seq_len: int, device: torch.device) -> dict[str, torch.Tensor]:
    """A seeded (2, seq_len) batch; the second row is padded after half its length, so that the
    exporter sees a mask that is not all ones."""
    config = loaded.model.config
    limit = getattr(config, "max_position_embeddings", None)
    if seq_len < 2 or (limit is not None and seq_len > limit):
        raise KDForgeError(f"export seq_len must be between 2 and the model's {limit or 'maximum'} positions, "
                           f"got {seq_len}; pass another seq_len")
    vocab = int(getattr(config, "vocab_size", None) or len(loaded.tokenizer))
    generator = torch.Generator().manual_seed(0)
    shape = (EXAMPLE_BATCH, seq_len)
    mask = torch.ones(shape, dtype=torch.long)
    mask[1, seq_len // 2:] = 0
    example = {"input_ids": torch.randint(0, vocab, shape, generator=generator), "attention_mask": mask,
               "token_type_ids": torch.zeros(shape, dtype=torch.long)}
    return {name: example[name].to(device) for name in text_input_names(loaded)}


def _in_channels(model: nn.Module, what: str) -> int:
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        raise KDForgeError(f"cannot export {what} to ONNX: only HF sequence classifiers and image nets "
                           "(vision:NAME) are supported, and this plain nn.Module has no Conv2d to take the "
                           "image channels from")
    return conv.in_channels


def _check_supported(loaded: LoadedModel) -> None:
    what = _model_name(loaded)
    if loaded.is_hf and not type(loaded.model).__name__.endswith("ForSequenceClassification"):
        raise KDForgeError(f"cannot export {what} to ONNX: only sequence classifiers (*ForSequenceClassification) "
                           "and vision nets (vision:NAME) are supported; export a classification model")
    size = sum(t.numel() * t.element_size() for t in (*loaded.model.parameters(), *loaded.model.buffers()))
    if size > MAX_SINGLE_FILE_BYTES:
        raise KDForgeError(f"cannot export {what} to ONNX: its {size / 2**30:.1f} GiB of weights exceed the 2 GB "
                           "a single ONNX file can hold; export a smaller student")


def _device(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def export_onnx(loaded: LoadedModel, path: Path, opset: int = 18, seq_len: int = 16,
                image_size: int = 32, example: torch.Tensor | None = None) -> Path:
    """Write ``loaded.model`` to ``path`` as ONNX (opset ``opset``, fp32) and return the path.

    ``seq_len`` / ``image_size`` only size the example input the exporter traces with; the file takes
    any batch size and sequence length (image height and width). ``example``: a plain module's input
    tensor (any shape, e.g. a user's own net); the file then takes any batch size and that example's
    other sizes. The model is exported in eval mode on its own device; the train/eval flag of every
    submodule is restored afterwards. The file is written to a temporary name in the same folder and
    renamed over ``path`` (atomic): a failed export leaves a previous file untouched. Unsupported models
    (a causal LM, a plain module that is not an image net and has no ``example``, over 2 GB) raise
    one-line :class:`KDForgeError`."""
    path = Path(path)
    _check_supported(loaded)
    model = loaded.model
    device = _device(model)
    if loaded.is_hf:
        wrapper: nn.Module = _TextLogits(model)
        kwargs = text_example(loaded, seq_len, device)
        batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
        dynamic_shapes: dict = {name: {0: batch, 1: sequence} for name in kwargs}
    else:
        wrapper = model
        parameter = next(iter(inspect.signature(model.forward).parameters))
        batch = torch.export.Dim("batch")
        if example is None:
            channels = _in_channels(model, _model_name(loaded))
            generator = torch.Generator().manual_seed(0)
            example = torch.randn((EXAMPLE_BATCH, channels, image_size, image_size), generator=generator)
            dynamic_shapes = {parameter: {0: batch, 2: torch.export.Dim("height"), 3: torch.export.Dim("width")}}
        else:  # the user's own input: any batch size (>= 2 to trace: sizes 0 and 1 are specialised)
            example = torch.cat([example] * EXAMPLE_BATCH)[:EXAMPLE_BATCH]
            dynamic_shapes = {parameter: {0: batch}}
        kwargs = {parameter: example.to(device)}
    input_names = list(kwargs) if loaded.is_hf else ["pixel_values"]
    modes = [(module, module.training) for module in model.modules()]
    # the exporter's notices ("torchvision is not installed") and, for a graph it cannot capture, the symbolic
    # shapes' dump of the graph: the one-line error below says what failed
    quieted = [logging.getLogger(name) for name in ("torch.onnx", "torch.fx.experimental.symbolic_shapes")]
    levels = [logger.level for logger in quieted]
    try:
        wrapper.eval()
        for logger in quieted:
            logger.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's deprecation / axis-naming chatter
            program = torch.onnx.export(wrapper, (), None, kwargs=kwargs, dynamo=True, opset_version=opset,
                                        input_names=input_names, output_names=["logits"],
                                        dynamic_shapes=dynamic_shapes, optimize=True, verbose=False)
        proto = program.model_proto
    except KDForgeError:
        raise
    except Exception as err:  # the exporter's own errors: name the model and the first line
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise KDForgeError(f"cannot export {_model_name(loaded)} to ONNX (opset {opset}): {first}") from err
    finally:
        for logger, level in zip(quieted, levels, strict=True):
            logger.setLevel(level)
        for module, training in modes:
            module.training = training
    proto.doc_string = f"kdforge export of {_model_name(loaded)}"
    return atomic_write_bytes(path, proto.SerializeToString())
