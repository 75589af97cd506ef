"""Int8 quantisation of an exported ONNX model: dynamic (``quantize_int8``, ONNX Runtime's
``quantize_dynamic``) and static with calibration (``quantize_static_int8``, ``quantize_static``).
``export.int8_mode`` picks one (or measures both: :mod:`kdforge.evaluation.int8_choice`).

Dynamic int8
------------
Dynamic quantisation (Jacob et al., "Quantization and Training of Neural Networks for Efficient
Integer-Arithmetic-Only Inference", CVPR 2018, eq. 1: ``r = S (q - Z)``) stores each weight matrix
as int8 ``q`` with one float scale ``S = max|W| / 127`` (symmetric, ``Z = 0``), i.e. ~1/4 of the fp32
bytes. At run time each activation tensor gets its own scale and zero point from its min / max
(``S = (max - min) / 255``, uint8), the matrix product runs in integers (int32 accumulation) and is
rescaled to float. No calibration data is needed.

Quantised ops: ``MatMul`` with a constant weight (all of a transformer's projections and feed-forward
layers; int8 as below) and ``Gather`` (the embedding tables, most of a small student's bytes; ONNX
Runtime stores them as uint8 with a zero point and de-quantises the gathered rows). Convolutions are
left in fp32: ONNX Runtime's dynamic ``ConvInteger`` kernel is far slower than its fp32 convolution
on CPU (resnet8x4, batch 32, 2 threads: 735 ms against 87 ms), so dynamic int8 does not pay for
vision nets (static quantisation with calibration would). ``quant_pre_process`` (ONNX Runtime's
suggested shape-inference pass) is not run: its symbolic shape inference fails on the graphs of the
``torch.export`` exporter, and the session's own graph optimisations do the fusing at load time.

Weight type: ``QInt8`` (signed weights, uint8 activations: "U8S8"). It is the combination x86
integer instructions are built for -- ``VPMADDUBSW`` (AVX2) and ``VPDPBUSD`` (AVX-512 VNNI /
AVX-VNNI) multiply *unsigned* 8-bit by *signed* 8-bit -- and ONNX Runtime's default for dynamic
quantisation on x86-64 CPUs. Measured (BERT, hidden 384, 2 layers, batch 32 x 64, 2 threads, VNNI
CPU): QInt8 weights 100 ms, QUInt8 176 ms, fp32 168 ms. Signed symmetric weights also keep ``Z = 0``,
so no zero-point correction is needed on the weight side. (On AVX2 without VNNI, ``VPMADDUBSW``
can saturate int16 sums; ONNX Runtime's docs say this rarely matters for accuracy, and
``reduce_range`` would trade precision for it.)

Static int8
-----------
The same scheme, ``r = S (q - Z)`` (Jacob et al. 2018, eq. 1), with the activations' ``S`` and ``Z``
fixed ahead of time: the fp32 model is run on calibration batches (:mod:`kdforge.deploy.calibration`:
a fixed sample of the *training* rows, ``export.calibration_rows``) and each quantised op's input and
output tensors get ``S = (max - min) / 255`` and ``Z = round(-min / S)`` from the min / max seen
(``CalibrationMethod.MinMax``; the range always includes 0, so that 0 -- padding, a ReLU's zeros -- is
exactly representable, Jacob et al. section 2.1). With every scale known, ONNX Runtime runs each
quantised op from int8 to int8 (``QLinearConv``, ``QLinearMatMul``, ``QLinearAdd``: int32 accumulation,
one fixed-point rescale ``S_a S_w / S_out``) and no min / max pass over the activations is left at run
time.

* Activations ``QUInt8`` (asymmetric, ``Z`` in [0, 255]): a ReLU's output is >= 0 and a GELU's
  >= -0.17, so a symmetric int8 range would waste half of its levels; weights ``QInt8`` symmetric
  (``Z = 0``), so the integer product ``sum (q_a - Z_a) q_w = sum q_a q_w - Z_a sum q_w`` needs no
  weight zero point (``sum q_w`` is a constant). U8S8 is also what the x86 instructions above multiply.
* Per-channel weight scales (``S_c = max|W_c| / 127`` per output channel; Krishnamoorthi,
  "Quantizing deep convolutional networks for efficient inference: A whitepaper", 2018): the exporter
  folds batch norm into each convolution, which scales every output channel by its own ``gamma /
  sigma``, so one scale per tensor would leave small channels a few levels. Measured: no speed
  difference; MiniLM-L6 MRPC argmax agreement with fp32 0.925 per-channel vs 0.895 per-tensor (every
  MatMul quantised), resnet32 CIFAR-10 0.992 vs 0.996 on 1000 test images.
* QDQ format (``QuantizeLinear`` / ``DequantizeLinear`` pairs around each quantised op, int8 weights
  stored with a ``DequantizeLinear``): a standard ONNX graph that ONNX Runtime turns into its
  ``QLinear*`` kernels at load time (``ORT_ENABLE_ALL``, :func:`kdforge.deploy.onnx_runtime.make_session`).
* Which ops. Convolutional nets (a ``Conv`` in the graph): every op ONNX Runtime quantises (``Conv``,
  ``Gemm``, ``Add``: the residual sums stay uint8 between convolutions; Conv + Gemm only was 2.11x fp32
  against 2.29x on resnet32). Other graphs (transformers): ``MatMul`` and ``Gather``, as dynamic int8;
  quantising every op (softmax, layer-norm and residual inputs too) broke MiniLM-L6 (argmax agreement
  0.235, per-tensor). Each feed-forward block's second projection -- the ``MatMul`` fed by the GELU, found by
  :func:`post_gelu_matmuls` in the plain and the fused graph -- stays fp32: a GELU's output is long-tailed
  (most values near 0, a few large), so one calibrated range leaves the bulk a handful of levels;
  excluding those 6 MatMuls of MiniLM-L6 raised the agreement from 0.925 to 0.975 (max |logit diff| 2.29
  -> 0.69), excluding any other group (attention products, q / k / v, attention output, embeddings)
  did not (0.91-0.935).
* Graphs. ``quantize_static`` runs ONNX's own shape inference, which passes the ``com.microsoft``
  contrib ops of the fused graph (:mod:`kdforge.deploy.onnx_fusion`) through, so the fused and the
  plain ``torch.export`` graphs quantise alike; ``quant_pre_process`` is not run (its symbolic shape
  inference fails on ``torch.export`` graphs, above). MinMax takes batches of different padded lengths;
  the histogram calibrators (Percentile, Entropy) need one shape (they failed on ragged batches) and,
  with padding to 128, did not help (agreement 0.895 and 0.92).

Measured (one process, interleaved :func:`kdforge.evaluation.latency.interleaved_latency`, 20 rounds,
1 thread, ONNX Runtime 1.32, AMD EPYC with AVX-512 VNNI, 2 logical CPUs, the machine *loaded*: 1-minute
load 4.1-4.6 on 2 CPUs, every measurement flagged noisy; speedups over fp32 with their 95% intervals):

* MiniLM-L6 fine-tuned on MRPC (the study's teacher), fused fp32 graph, batch 32 x 64 tokens: fp32
  305 ms, dynamic 155 ms (1.98x [1.94, 2.01]), static 222 ms (1.38x [1.36, 1.40]). On the first 200
  MRPC dev pairs: argmax agreement with fp32 dynamic 0.955 / static 0.975, max |logit diff| 1.62 / 0.69,
  accuracy fp32 0.810, dynamic 0.785, static 0.805. Files 87.3 / 22.3 / 33.1 MB (static keeps the
  GELU-fed projections in fp32). Static every-MatMul (no exclusion): 171 ms vs dynamic 155 ms in another
  interleaved measurement, agreement 0.925. So on transformers dynamic int8 is the faster, static the closer:
  static's extra ``QuantizeLinear`` / ``DequantizeLinear`` passes around each MatMul and the fp32 ops
  between them cost more than the per-call min / max dynamic int8 does.
* ResNet on CIFAR-10, batch 32 (3 x 32 x 32): resnet32 (the trained CIFAR-10 teacher) fp32 21.4 ms,
  dynamic 21.5 ms (1.00x [0.99, 1.01]: only the classifier's MatMul is quantised), static 9.4 ms (2.27x [2.25,
  2.31]); on 1000 random test images agreement with fp32 0.999 / 0.993, accuracy 0.871 / 0.872 / 0.873;
  files 1.92 / 1.92 / 0.61 MB. resnet20 (random init): 12.8 ms, 12.9 ms (0.99x [0.98, 1.01]), 5.9 ms
  (2.15x [2.13, 2.17]).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from kdforge.errors import KDForgeError

#: the op types quantize_int8 quantises (see the module docstring)
INT8_OP_TYPES = ("MatMul", "Gather")
#: static int8 of a network without convolutions (a transformer): the same ops as dynamic int8
STATIC_TEXT_OP_TYPES = INT8_OP_TYPES
#: the op types whose output is a GELU (fused by ONNX Runtime, or the ``Erf`` of the exact formula)
GELU_OP_TYPES = ("Gelu", "BiasGelu", "FastGelu", "Erf")
#: element-wise ops the decomposed GELU ``0.5 x (1 + erf(x / sqrt 2))`` is built of
_GELU_PARTS = ("Mul", "Add", "Div")


def _drop_preprocess_advice(record: logging.LogRecord) -> bool:
    """Root-logger filter: drop the quantizers' "Please consider (to run) pre-processing" warnings
    (its pre-processing is ONNX Runtime's own graph optimisation, which make_session enables)."""
    return not str(record.msg).startswith("Please consider")


def _write_quantized(onnx_path: Path, out_path: Path, quantize: Callable[[str], None], what: str) -> Path:
    """``quantize(tmp_name)`` writes the quantised ``onnx_path`` to a temporary file in the destination
    folder, which is then renamed over ``out_path`` (atomic); its errors are one line naming the file."""
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    if not onnx_path.is_file():
        raise KDForgeError(f"ONNX model {onnx_path} does not exist; export it first (kdforge.deploy.export_onnx)")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=out_path.parent, prefix=f".{out_path.name}.", suffix=".onnx.tmp")
    os.close(fd)
    root = logging.getLogger()
    root.addFilter(_drop_preprocess_advice)
    try:
        try:
            quantize(tmp_name)
        except KDForgeError:
            raise
        except Exception as err:  # onnx / onnxruntime errors on an unreadable or foreign file
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise KDForgeError(f"cannot quantise {onnx_path} to {what} int8 ({first}); export it again") from err
        finally:
            root.removeFilter(_drop_preprocess_advice)
        with open(tmp_name, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, out_path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return out_path


def quantize_int8(onnx_path: Path, out_path: Path) -> Path:
    """Write the dynamic-int8 version of the fp32 ONNX model ``onnx_path`` to ``out_path`` (atomic:
    a temporary file in the destination folder, renamed over it) and return ``out_path``. Inputs and
    the ``logits`` output keep their names and types, so the int8 file runs wherever the fp32 one does."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    def quantize(tmp_name: str) -> None:
        quantize_dynamic(onnx_path, tmp_name, op_types_to_quantize=list(INT8_OP_TYPES),
                         weight_type=QuantType.QInt8, use_external_data_format=False)

    return _write_quantized(onnx_path, out_path, quantize, "dynamic")


def _from_gelu(tensor: str, producers: dict, depth: int = 3) -> bool:
    """Whether ``tensor`` is a GELU's output: made by a GELU op, or by the element-wise ops of the exact
    formula (at most ``depth`` of them) over an ``Erf``."""
    node = producers.get(tensor)
    if node is None:
        return False
    if node.op_type in GELU_OP_TYPES:
        return True
    return depth > 0 and node.op_type in _GELU_PARTS and any(_from_gelu(i, producers, depth - 1) for i in node.input)


def post_gelu_matmuls(graph) -> list[str]:
    """The names of the ``MatMul`` nodes that take a GELU's output (each feed-forward block's second
    projection): left in fp32 by :func:`quantize_static_int8` (see the module docstring)."""
    producers = {out: node for node in graph.node for out in node.output}
    return [n.name for n in graph.node if n.op_type == "MatMul" and _from_gelu(n.input[0], producers)]


class BatchReader:
    """``quantize_static``'s calibration data reader over ``batches`` (dicts of the session's numpy
    inputs, :func:`kdforge.deploy.onnx_runtime.session_feeds`), read once; ``given``: how many it gave."""

    def __init__(self, batches: Iterable[dict[str, np.ndarray]]):
        self._batches = iter(batches)
        self.given = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        self.given += batch is not None
        return batch


def quantize_static_int8(onnx_path: Path, out_path: Path, batches: Iterable[dict[str, np.ndarray]]) -> Path:
    """Write the static-int8 version (QDQ, per-channel int8 weights, uint8 activations calibrated by
    min / max on ``batches``; see the module docstring) of the fp32 ONNX model ``onnx_path`` to ``out_path``
    (atomic, as :func:`quantize_int8`) and return ``out_path``. ``batches``: the session's numpy inputs
    (:func:`kdforge.deploy.onnx_runtime.session_feeds`) of calibration rows, e.g. a fixed sample of the
    training rows (:mod:`kdforge.deploy.calibration`); none at all is a one-line error. Convolutional nets:
    every op ONNX Runtime quantises (Conv, Gemm, Add, ...); others: ``MatMul`` and ``Gather``, the
    projections fed by a GELU left in fp32."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    reader = BatchReader(batches)

    def quantize(tmp_name: str) -> None:
        graph = onnx.load(str(onnx_path), load_external_data=False).graph
        convolutional = any(node.op_type == "Conv" for node in graph.node)
        try:
            quantize_static(onnx_path, tmp_name, reader, quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax,
                            op_types_to_quantize=None if convolutional else list(STATIC_TEXT_OP_TYPES),
                            nodes_to_exclude=None if convolutional else post_gelu_matmuls(graph),
                            use_external_data_format=False)
        except ValueError:
            if reader.given == 0:
                raise KDForgeError(f"cannot quantise {onnx_path} to static int8: no calibration batches were given; "
                                   "pass the session inputs of some training rows") from None
            raise

    return _write_quantized(onnx_path, out_path, quantize, "static")
