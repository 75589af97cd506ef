"""ONNX forms of one fine-tuned text classifier (issue 20, section 3): PyTorch fp32, ONNX fp32 (plain and with
ONNX Runtime's transformer fusions, ``export.fuse``), dynamic int8 and static int8 (``export.int8_mode``), all
timed together, interleaved in one process (batch 32 x the task's max length, 20 rounds, 1 thread; speedups
over PyTorch with 95% intervals), each scored on the task's dev set (agreement with the PyTorch argmax).

    .venv/bin/python benchmarks/onnx_forms.py MODEL_DIR [--config configs/glue/mrpc.yaml]   # -> results/onnx_forms.md
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from kdforge.config import load_config
from kdforge.deploy.calibration import calibration_batches
from kdforge.deploy.onnx_export import export_onnx
from kdforge.deploy.onnx_fusion import fuse_transformer
from kdforge.deploy.onnx_runtime import OnnxAdapter, make_session, onnx_forward
from kdforge.deploy.quantize import quantize_int8, quantize_static_int8
from kdforge.engine.predict import predict
from kdforge.evaluation.latency import interleaved_latency, text_inputs
from kdforge.io import atomic_write_text
from kdforge.models.adapter import ModelAdapter
from kdforge.models.loading import load_model
from kdforge.provenance import cpu_model
from kdforge.tasks.base import build_task

RESULTS = Path(__file__).parent / "results"


def files(loaded, task, folder: Path) -> dict[str, Path]:
    """The ONNX forms of ``loaded``, written into ``folder``."""
    plain = export_onnx(loaded, folder / "plain.onnx")
    fused = Path(shutil.copy(plain, folder / "fused.onnx"))
    fuse_transformer(fused, loaded)
    _, batches = calibration_batches(task, loaded, fused, 256, 32)
    return {"onnx fp32": plain, "onnx fp32 fused": fused,
            "dynamic int8 (fused)": quantize_int8(fused, folder / "dynamic.onnx"),
            "static int8 (fused)": quantize_static_int8(fused, folder / "static.onnx", batches)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--config", default="configs/glue/mrpc.yaml")
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = load_config(args.config)
    task = build_task(config.task)
    loaded = load_model(args.model, task, "model", trained_head=True)
    loaded.model.eval()
    dev, collate = task.split(task.eval_split), task.collator(loaded.tokenizer, train=False)
    reference = predict(ModelAdapter(loaded.model), dev, collate, 64, "cpu")[0].argmax(-1)
    inputs = text_inputs(loaded.tokenizer, 32, config.task.max_length)
    forwards = {"pytorch fp32": lambda bs: loaded.model(**inputs)}
    scores = {"pytorch fp32": (task.scores(*predict(ModelAdapter(loaded.model), dev, collate, 64, "cpu")), 1.0)}
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in files(loaded, task, Path(tmp)).items():
            session = make_session(path, 1)
            logits, labels = predict(OnnxAdapter(session), dev, collate, 64, "cpu")
            scores[name] = (task.scores(logits, labels), float(np.mean(logits.argmax(-1) == reference)))
            forwards[name] = onnx_forward(session, lambda bs: inputs)
        timing = interleaved_latency(forwards, [32], 3, 20, 1)
    metric = task.main_metric
    lines = ["# ONNX forms of one model", "", __doc__.split("\n\n")[0].replace("\n", " "), "",
             f"Model: `{args.model}`; task {task.name} (dev, {len(dev)} rows); CPU {cpu_model()}; noisy: "
             f"{'yes: ' + '; '.join(timing['noisy_reasons']) if timing['noisy'] else 'no'}.", "",
             f"| form | {metric} | agreement with PyTorch | b32 ms | speedup over PyTorch [95%] |",
             "|---|---:|---:|---:|---:|"]
    for name, (scored, agreement) in scores.items():
        speed = timing["speedup"].get(name, {}).get("32")
        cell = f"{speed['ratio']:.2f}x [{speed['low']:.2f}-{speed['high']:.2f}]" if speed else "reference"
        lines.append(f"| {name} | {scored.metrics[metric]:.4f} | {agreement:.3f} | "
                     f"{timing['models'][name]['batch_sizes']['32']['median_ms']:.1f} | {cell} |")
    atomic_write_text(RESULTS / "onnx_forms.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
