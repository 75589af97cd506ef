"""Deployment formats: a trained model as a folder the ecosystem loads, an ONNX file, its int8
version, ONNX Runtime inference, and the exported student's model card.

* :mod:`kdforge.deploy.export` -- ``export_model(loaded, folder)``: Hugging Face ``save_pretrained``
  (+ tokenizer) or a built-in vision net's safetensors, written atomically.
* :mod:`kdforge.deploy.model_card` -- ``write_model_card``: the Hugging Face ``README.md`` of the
  exported student.
* :mod:`kdforge.deploy.onnx_export` -- ``export_onnx(loaded, path)``: fp32 ONNX with dynamic batch
  (and sequence) axes, written atomically.
* :mod:`kdforge.deploy.quantize` -- ``quantize_int8(onnx_path, out_path)``: dynamic int8;
  ``quantize_static_int8(onnx_path, out_path, batches)``: static int8 calibrated on ``batches``.
* :mod:`kdforge.deploy.calibration` -- ``calibration_batches``: a fixed sample of a task's training rows
  as the ONNX file's inputs (static int8's calibration data).
* :mod:`kdforge.deploy.onnx_runtime` -- ``make_session``, ``OnnxAdapter`` (scored by ``Task.evaluate``
  like a PyTorch model) and ``onnx_forward`` (for latency timing).

The ONNX submodules import onnx / onnxruntime, so import them where they are needed.
"""
