"""Run an exported ONNX file with ONNX Runtime (CPU): a session, an adapter that ``Task.evaluate``
scores exactly like a PyTorch model, and a ``forward(batch_size)`` for latency timing."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from kdforge.errors import KDForgeError
from kdforge.models.adapter import NON_INPUT_KEYS
from kdforge.models.outputs import Outputs

#: ONNX element types of the inputs kdforge exports, and the numpy dtype each is fed as
_NUMPY_TYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float)": np.float32}


def make_session(path: str | Path, threads: int | None = None) -> ort.InferenceSession:
    """An ONNX Runtime session on the CPU for the model in ``path``.

    ``threads`` intra-op threads (``None``: ONNX Runtime's default, one per physical core), one
    inter-op thread (sequential execution: the graphs are a single chain of layers), every graph
    optimisation (``ORT_ENABLE_ALL``: constant folding, node fusions such as attention / GELU /
    LayerNorm). Idle intra-op threads sleep instead of spin-waiting, so that a session does not eat
    the cores of PyTorch code that runs between its calls (latency tables time both in one process).
    A missing or unreadable file is a one-line :class:`KDForgeError`."""
    path = Path(path)
    if not path.is_file():
        raise KDForgeError(f"ONNX model {path} does not exist; export it first (kdforge.deploy.export_onnx)")
    if threads is not None and int(threads) < 1:
        raise KDForgeError(f"ONNX Runtime threads must be >= 1 (or None for the default), got {threads}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 0 if threads is None else int(threads)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own exception types (InvalidProtobuf, Fail, ...)
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise KDForgeError(f"cannot load ONNX model {path} ({first}); export it again") from None


def _to_numpy(value: Any, onnx_type: str) -> np.ndarray:
    array = value.detach().cpu().numpy() if torch.is_tensor(value) else np.asarray(value)
    return array.astype(_NUMPY_TYPES.get(onnx_type, array.dtype), copy=False)


def session_feeds(session: ort.InferenceSession, inputs: dict[str, Any] | torch.Tensor) -> dict[str, np.ndarray]:
    """The session's inputs from a batch dict (keys the session does not take are dropped) or from one
    tensor (fed to the session's only input), cast to the dtypes the graph declares."""
    declared = {i.name: i.type for i in session.get_inputs()}
    if not isinstance(inputs, dict):
        if len(declared) != 1:
            raise KDForgeError(f"the ONNX model takes {sorted(declared)}, not one tensor; pass a dict of inputs")
        inputs = {next(iter(declared)): inputs}
    elif "pixel_values" in declared and "pixel_values" not in inputs and "inputs" in inputs:
        inputs = {**inputs, "pixel_values": inputs["inputs"]}  # the api's (x, y) collation names it "inputs"
    missing = [name for name in declared if name not in inputs]
    if missing:
        raise KDForgeError(f"the batch has no {', '.join(missing)} (keys: {sorted(inputs)}), which the ONNX model "
                           "takes; tokenize with the tokenizer the model was exported with")
    return {name: _to_numpy(inputs[name], onnx_type) for name, onnx_type in declared.items()}


class OnnxAdapter(nn.Module):
    """``OnnxAdapter(session)(batch) -> Outputs(logits=...)``: an ONNX Runtime session behind the
    interface of :class:`kdforge.models.adapter.ModelAdapter`, so that
    ``task.evaluate(OnnxAdapter(session), data, collate, batch_size)`` scores the ONNX model exactly as
    it scores a PyTorch one. Batch keys in ``NON_INPUT_KEYS`` and keys the session does not take are
    dropped; ``teacher=True`` reads ``batch["teacher_input_ids"]`` as the input ids, as ModelAdapter
    does. Logits come back as a float32 CPU tensor; hidden states, attentions and features are not
    available. The module has no parameters; train()/eval() change nothing in the session."""

    def __init__(self, session: ort.InferenceSession, teacher: bool = False):
        super().__init__()
        self.session = session
        self.teacher = teacher
        self.output_name = session.get_outputs()[0].name

    def forward(self, batch: dict[str, Any]) -> Outputs:
        inputs = {k: v for k, v in batch.items() if k not in NON_INPUT_KEYS}
        if self.teacher and "teacher_input_ids" in batch:
            inputs["input_ids"] = batch["teacher_input_ids"]
        (logits,) = self.session.run([self.output_name], session_feeds(self.session, inputs))
        return Outputs(logits=torch.from_numpy(np.ascontiguousarray(logits)))


def onnx_forward(session: ort.InferenceSession,
                 make_inputs: Callable[[int], dict[str, torch.Tensor] | torch.Tensor]) -> Callable[[int], Any]:
    """``forward(batch_size)`` running ``session`` on ``make_inputs(batch_size)`` (the dict of
    :func:`kdforge.evaluation.latency.text_inputs` or the tensor of ``image_inputs``), for
    :func:`kdforge.evaluation.latency.measure_latency`. The numpy inputs of each batch size are built
    on its first call and reused, so only the session's run is timed."""
    output_names = [session.get_outputs()[0].name]
    prepared: dict[int, dict[str, np.ndarray]] = {}

    def forward(batch_size: int) -> Any:
        feeds = prepared.get(batch_size)
        if feeds is None:
            feeds = prepared[batch_size] = session_feeds(session, make_inputs(batch_size))
        return session.run(output_names, feeds)

    return forward
