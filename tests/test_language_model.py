"""Causal language modelling: the lm task's metrics, next-token CE, the per-token teacher cache, GGUF
model folders, and the GLMD recipe end to end (three stages, half vocabulary, plain-HF export)."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import kdforge
from kdforge import jobs
from kdforge.config import validate_config
from kdforge.errors import KDForgeError
from kdforge.models.adapter import ModelAdapter
from kdforge.models.loading import gguf_file, package_model_dir
from kdforge.models.outputs import Outputs
from kdforge.objectives.base import Progress
from kdforge.objectives.logit import NextTokenCrossEntropy
from kdforge.recipes.teacher_cache import CacheSpec, TeacherCache, compute_outputs
from kdforge.tasks.base import ListDataset
from kdforge.tasks.language_model import LMCollator, next_token_targets
from tests.helpers import bpe_corpus, tiny_llama, train_bpe_tokenizer


@pytest.fixture(scope="module")
def lm_tree(tmp_path_factory) -> Path:
    """A tiny 2-layer Llama teacher trained briefly on BPE text, and train/general/dev text files."""
    folder = tmp_path_factory.mktemp("lm")
    tokenizer = train_bpe_tokenizer()
    torch.manual_seed(0)
    teacher = tiny_llama(len(tokenizer), 32, layers=2).train()
    texts = bpe_corpus(200, seed=3)
    optimizer = torch.optim.Adam(teacher.parameters(), lr=1e-2)
    for step in range(40):
        batch = tokenizer(texts[(step * 32) % 200:][:32], return_tensors="pt", padding=True)
        labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
        loss = F.cross_entropy(*next_token_targets(teacher(**batch).logits, labels))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    teacher.eval().save_pretrained(folder / "teacher")
    tokenizer.save_pretrained(folder / "teacher")
    for name, seed, n in (("train", 5, 120), ("general", 6, 120), ("dev", 7, 30)):
        (folder / f"{name}.txt").write_text("\n".join(bpe_corpus(n, seed=seed)))
    return folder


def lm_job(tree: Path, out: Path, **student) -> dict:
    return {
        "task": {"name": "lm", "corpus": {"files": [str(tree / "train.txt")]}, "dev_file": str(tree / "dev.txt"),
                 "max_length": 16},
        "teacher": {"model": str(tree / "teacher")},
        "student": {"layers": [0], **student},
        "stages": [
            {"name": "general", "data": "corpus", "corpus": {"files": [str(tree / "general.txt")]},
             "objectives": [{"name": "word_kd"}]},
            {"name": "task_text", "objectives": [{"name": "word_kd"}]},
            {"name": "soft_labels", "objectives": [{"name": "word_kd", "temperature": 1.0}]},
        ],
        "train": {"epochs": 2, "batch_size": 16, "lr": 3e-3, "seed": 0, "device": "cpu"},
        "teacher_cache": {"top_k": 16, "folder": str(out / "cache")},
        "eval": {"latency_batch_sizes": [1], "latency_seq_len": 8, "latency_repeats": 1, "latency_warmup": 0},
        "output_dir": str(out / "run"),
    }


def hand_perplexity(model, tokenizer, texts) -> float:
    """exp(mean over real next tokens of -log p), computed here without kdforge."""
    batch = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=16)
    with torch.no_grad():
        logits = model(**batch).logits
    nll, n = 0.0, 0
    for row in range(len(texts)):
        length = int(batch.attention_mask[row].sum())
        log_p = logits[row, : length - 1].double().log_softmax(-1)
        nll -= log_p.gather(1, batch.input_ids[row, 1:length, None]).sum().item()
        n += length - 1
    return math.exp(nll / n)


# -- task, collator, loss ------------------------------------------------------------------------------------------


def test_collator_masks_padding_in_labels():
    tokenizer = train_bpe_tokenizer()
    batch = LMCollator(tokenizer, 16)([{"text_a": "the cat"}, {"text_a": "the cat sat on the big mat"}])
    mask = batch["attention_mask"]
    assert mask[0].sum() < mask[1].sum()
    assert torch.equal(batch["labels"][mask == 1], batch["input_ids"][mask == 1])
    assert bool((batch["labels"][mask == 0] == -100).all())


def test_next_token_targets_shift_by_one_and_drop_padding():
    logits = torch.arange(2 * 3 * 4, dtype=torch.float).reshape(2, 3, 4)
    labels = torch.tensor([[1, 2, 3], [0, 1, -100]])
    rows, targets = next_token_targets(logits, labels)
    assert torch.equal(targets, torch.tensor([2, 3, 1]))  # position j is scored against label j + 1
    assert torch.equal(rows, torch.stack([logits[0, 0], logits[0, 1], logits[1, 0]]))
    with pytest.raises(KDForgeError, match="causal LM"):
        next_token_targets(torch.zeros(2, 4), labels)


def test_next_token_ce_is_the_mean_negative_log_likelihood_of_the_next_tokens():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5, requires_grad=True)
    labels = torch.tensor([[1, 2, 3, 4], [0, 1, -100, -100]])
    loss = NextTokenCrossEntropy()(Outputs(logits=logits), None, {"labels": labels}, Progress())
    log_p = logits.log_softmax(-1)
    by_hand = -(log_p[0, 0, 2] + log_p[0, 1, 3] + log_p[0, 2, 4] + log_p[1, 0, 1]) / 4
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-6)
    loss.backward()
    assert logits.grad[1, 1:].abs().sum() == 0  # positions predicting padding (or nothing) get no gradient


def test_streaming_evaluation_equals_the_hand_perplexity(lm_tree):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdforge.tasks.base import build_task

    task = build_task(validate_config(lm_job(lm_tree, lm_tree)).task)
    model = AutoModelForCausalLM.from_pretrained(lm_tree / "teacher").eval()
    tokenizer = AutoTokenizer.from_pretrained(lm_tree / "teacher")
    dev = task.split("dev")
    scores = task.evaluate(ModelAdapter(model), dev, task.collator(tokenizer), batch_size=7)
    texts = [e["text_a"] for e in dev]
    assert scores.metrics["perplexity"] == pytest.approx(hand_perplexity(model, tokenizer, texts), rel=1e-5)
    assert scores.metrics["cross_entropy"] == pytest.approx(math.log(scores.metrics["perplexity"]), rel=1e-9)
    assert 0 <= scores.ece <= 1 and scores.reliability["n_samples"] > len(texts)  # one prediction per token
    assert task.greater_is_better is False and len(task.split("train")) == len(set(bpe_corpus(120, seed=5)))


# -- per-token teacher cache ---------------------------------------------------------------------------------------


def test_per_token_cache_returns_real_positions_dense_or_top_k(lm_tree):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(lm_tree / "teacher").eval()
    tokenizer = AutoTokenizer.from_pretrained(lm_tree / "teacher")
    data = ListDataset([{"text_a": t} for t in bpe_corpus(10, seed=9)])
    collate = LMCollator(tokenizer, 16)
    batch = collate([data[i] for i in (3, 7)])
    with torch.no_grad():
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    real = batch["attention_mask"].bool()
    index = torch.tensor([3, 7])

    dense = TeacherCache(compute_outputs(model, data, collate, 4, "cpu", CacheSpec()), "k")
    got = dense.lookup({**batch, "index": index}).logits
    assert torch.allclose(got[real], full[real], atol=1e-5) and bool((got[~real] == 0).all())

    k = 8
    sparse = TeacherCache(compute_outputs(model, data, collate, 4, "cpu", CacheSpec(top_k=k)), "k")
    got = sparse.lookup({**batch, "index": index}).logits[real].softmax(-1)
    want = full[real].softmax(-1)
    top = want.topk(k, dim=-1)
    assert torch.allclose(got.gather(1, top.indices), top.values, atol=1e-5)  # top-k probabilities exact
    rest = (1 - top.values.sum(-1, keepdim=True)) / (want.shape[-1] - k)  # the others share the rest equally
    others = got.scatter(1, top.indices, float("nan"))
    assert torch.allclose(others[~others.isnan()].reshape(len(got), -1), rest.expand(-1, want.shape[-1] - k),
                          atol=1e-6)


def test_a_dense_per_token_cache_too_large_for_memory_is_refused(monkeypatch):
    from kdforge.recipes import teacher_cache as cache

    first = cache._token_rows(torch.randn(2, 3, 5000), torch.ones(2, 3), CacheSpec(dtype=torch.float16))
    assert first["logits"].shape == (6, 5000)  # 3 tokens x 5000 words x 2 bytes per example
    monkeypatch.setattr(cache, "DENSE_TOKEN_CACHE_MAX_BYTES", 30000 * 1000)
    cache._check_dense_size(first, batch_size=2, n_examples=1000)  # 30 MB: allowed
    with pytest.raises(KDForgeError, match="teacher_cache.top_k"):
        cache._check_dense_size(first, batch_size=2, n_examples=1001)
    rows = cache._token_rows(torch.randn(2, 3, 5000), torch.ones(2, 3), CacheSpec(top_k=4))
    assert rows["values"].shape == (6, 4) and "logits" not in rows


# -- GGUF folders and packages -------------------------------------------------------------------------------------


def test_package_with_gguf_weights_is_found_without_importing_it(tmp_path, monkeypatch):
    package = tmp_path / "site" / "fake_gguf_llm"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('needs llama_cpp')\n")
    (package / "Tiny-Q4.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert package_model_dir("fake-gguf-llm") == package
    assert gguf_file(package) == "Tiny-Q4.gguf"
    assert "fake_gguf_llm" not in sys.modules
    (package / "Other.gguf").write_bytes(b"GGUF")
    with pytest.raises(KDForgeError, match="several .gguf"):
        gguf_file(package)


# -- GLMD end to end -----------------------------------------------------------------------------------------------


def test_glmd_three_stages_with_half_vocabulary_export_to_plain_transformers(lm_tree, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = kdforge.distill(lm_job(lm_tree, tmp_path, vocab_fraction=0.5))  # the Python API
    run = result.run_dir
    metrics = json.loads((run / "metrics.json").read_text())
    assert [h["stage"] for h in metrics["history"]] == ["general"] * 2 + ["task_text"] * 2 + ["soft_labels"] * 2
    teacher_vocab = len(AutoTokenizer.from_pretrained(lm_tree / "teacher"))

    model = AutoModelForCausalLM.from_pretrained(run / "student").eval()
    tokenizer = AutoTokenizer.from_pretrained(run / "student")
    assert model.config.vocab_size == teacher_vocab // 2 and model.config.num_hidden_layers == 1
    dev = list(dict.fromkeys((lm_tree / "dev.txt").read_text().splitlines()))  # the task drops repeats
    student_ppl = metrics["student"]["metrics"]["perplexity"]
    # the plain-transformers export scores the held-out text exactly as kdforge did
    assert hand_perplexity(model, tokenizer, dev) == pytest.approx(student_ppl, rel=1e-5)
    # and it learned: far below the uniform guess over its vocabulary
    assert student_ppl < 0.2 * model.config.vocab_size


def test_word_kd_teaches_a_fresh_narrower_student_the_teachers_distribution(lm_tree, tmp_path):
    """A freshly initialised student, half the teacher's width and depth, starts near the uniform guess;
    one task stage of word-prediction KD must bring it close to the teacher's held-out perplexity."""
    tree = lm_job(lm_tree, tmp_path)
    tree["student"] = {"config": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1}}
    tree["stages"] = [{"name": "task_text", "objectives": [{"name": "word_kd", "temperature": 1.0}],
                       "train": {"epochs": 4, "lr": 1e-2}}]
    result = jobs.run_distill(validate_config(tree))
    history = json.loads((result.run_dir / "metrics.json").read_text())["history"]
    vocab = len(train_bpe_tokenizer())
    assert history[0]["perplexity"] > result.student.metrics["perplexity"]
    assert result.student.metrics["perplexity"] < 0.2 * vocab
    assert result.student.metrics["perplexity"] < 2 * result.teacher.metrics["perplexity"]
