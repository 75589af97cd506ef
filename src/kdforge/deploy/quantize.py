"""Dynamic int8 quantisation of an exported ONNX model (ONNX Runtime's ``quantize_dynamic``).

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
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from kdforge.errors import KDForgeError

#: the op types quantize_int8 quantises (see the module docstring)
INT8_OP_TYPES = ("MatMul", "Gather")


def _drop_preprocess_advice(record: logging.LogRecord) -> bool:
    """Root-logger filter: drop quantize_dynamic's "Please consider to run pre-processing" warning
    (its pre-processing is ONNX Runtime's own graph optimisation, which make_session enables)."""
    return not str(record.msg).startswith("Please consider to run pre-processing")


def quantize_int8(onnx_path: Path, out_path: Path) -> Path:
    """Write the dynamic-int8 version of the fp32 ONNX model ``onnx_path`` to ``out_path`` (atomic:
    a temporary file in the destination folder, renamed over it) and return ``out_path``. Inputs and
    the ``logits`` output keep their names and types, so the int8 file runs wherever the fp32 one does."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

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
            quantize_dynamic(onnx_path, tmp_name, op_types_to_quantize=list(INT8_OP_TYPES),
                             weight_type=QuantType.QInt8, use_external_data_format=False)
        except Exception as err:  # onnx / onnxruntime errors on an unreadable or foreign file
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise KDForgeError(f"cannot quantise {onnx_path} to int8 ({first}); export it again") from err
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
