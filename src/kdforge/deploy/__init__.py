"""Deployment formats: a trained model as an ONNX file, its int8 version, and ONNX Runtime inference.

* :mod:`kdforge.deploy.onnx_export` -- ``export_onnx(loaded, path)``: fp32 ONNX with dynamic batch
  (and sequence) axes, written atomically.
* :mod:`kdforge.deploy.quantize` -- ``quantize_int8(onnx_path, out_path)``: dynamic int8 weights.
* :mod:`kdforge.deploy.onnx_runtime` -- ``make_session``, ``OnnxAdapter`` (scored by ``Task.evaluate``
  like a PyTorch model) and ``onnx_forward`` (for latency timing).

The submodules import onnx / onnxruntime, so import them where they are needed.
"""
