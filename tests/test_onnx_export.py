"""ONNX export, int8 quantisation and ONNX Runtime inference (kdforge.deploy) on tiny random-init models:
the ONNX logits equal PyTorch's at other batch sizes / sequence lengths than the export's, the int8
file is ~4x smaller and close, and Task.evaluate scores an OnnxAdapter exactly like the PyTorch model."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from kdforge.deploy.onnx_export import export_onnx
from kdforge.deploy.onnx_runtime import OnnxAdapter, make_session, onnx_forward
from kdforge.deploy.quantize import quantize_int8
from kdforge.errors import KDForgeError
from kdforge.models.loading import LoadedModel
from tests.helpers import tiny_bert, tiny_llama

FP32_ATOL = 1e-4  # fp32 ONNX Runtime vs PyTorch: same math, other kernels / summation order


def _modes(model: torch.nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


@pytest.fixture(scope="module")
def text_export(tmp_path_factory, tokenizer_dir):
    """A 2-layer tiny BERT (BERT tokenizer, vocab 30522) exported while in *train* mode with its pooler in
    eval mode (a mixed state that a blanket model.train() would not restore), then quantised."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = tiny_bert(len(tokenizer), layers=2, seed=3).train()
    model.bert.pooler.eval()
    before = _modes(model)
    folder = tmp_path_factory.mktemp("onnx_text")
    fp32 = export_onnx(LoadedModel(model, tokenizer, "tiny"), folder / "model.onnx", seq_len=16)
    after = _modes(model)
    int8 = quantize_int8(fp32, folder / "model.int8.onnx")
    model.eval()
    return {"model": model, "tokenizer": tokenizer, "fp32": fp32, "int8": int8, "before": before, "after": after,
            "folder": folder}


def _text_batch(batch_size: int, seq_len: int, vocab: int, seed: int) -> dict[str, torch.Tensor]:
    """Random ids with ragged padding (row i keeps seq_len - i tokens, at least 1)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, vocab, (batch_size, seq_len), generator=generator)
    mask = torch.ones_like(ids)
    for row in range(batch_size):
        mask[row, max(1, seq_len - row):] = 0
    types = torch.zeros_like(ids)
    types[:, seq_len // 2:] = 1  # a second segment, so token_type_ids matter
    return {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": types}


def _run(session, batch: dict[str, torch.Tensor]) -> np.ndarray:
    return OnnxAdapter(session)(batch).logits.numpy()


@pytest.mark.parametrize(("batch_size", "seq_len"), [(1, 7), (5, 23)])
def test_fp32_onnx_matches_pytorch_at_other_batch_sizes_and_lengths(text_export, batch_size, seq_len):
    """Exported with a (2, 16) example; dynamic axes must give PyTorch's logits at (1, 7) and (5, 23)."""
    model, tokenizer = text_export["model"], text_export["tokenizer"]
    session = make_session(text_export["fp32"], threads=1)
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask", "token_type_ids"]
    assert all(i.type == "tensor(int64)" and i.shape == ["batch", "sequence"] for i in session.get_inputs())
    assert [o.name for o in session.get_outputs()] == ["logits"]
    batch = _text_batch(batch_size, seq_len, len(tokenizer), seed=batch_size)
    with torch.no_grad():
        expected = model(**batch).logits.numpy()
    got = _run(session, batch)
    assert got.shape == (batch_size, 2)
    np.testing.assert_allclose(got, expected, atol=FP32_ATOL, rtol=0)
    # padding is honoured: changing the ids under the mask changes nothing
    masked = dict(batch, input_ids=torch.where(batch["attention_mask"].bool(), batch["input_ids"], 2000))
    np.testing.assert_allclose(_run(session, masked), got, atol=FP32_ATOL, rtol=0)


def test_export_restores_every_module_mode_and_writes_no_stray_files(text_export):
    """The export ran in eval mode (the ONNX logits equal the eval model's, above) yet the model's mixed
    train/eval flags are as before; only the two requested files are in the folder (no temp files)."""
    assert text_export["after"] == text_export["before"]
    assert text_export["before"][0] is True and False in text_export["before"]
    assert sorted(p.name for p in text_export["folder"].iterdir()) == ["model.int8.onnx", "model.onnx"]
    assert next(text_export["model"].parameters()).device.type == "cpu"


def test_int8_file_is_about_four_times_smaller_and_its_logits_stay_close(text_export):
    fp32_bytes, int8_bytes = text_export["fp32"].stat().st_size, text_export["int8"].stat().st_size
    assert 3.0 < fp32_bytes / int8_bytes < 4.2  # int8 weights: 1/4 of the bytes, plus scales and fp32 leftovers
    graph = onnx.load(str(text_export["int8"])).graph
    eight_bit = [t for t in graph.initializer if t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)]
    assert sum(int(np.prod(t.dims)) for t in eight_bit) > 0.95 * sum(
        p.numel() for p in text_export["model"].parameters())  # nearly all weights stored in 8 bits
    assert any(n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul") for n in graph.node)

    vocab = len(text_export["tokenizer"])
    batch = _text_batch(64, 12, vocab, seed=11)
    batch["attention_mask"][:] = 1  # full rows: 64 distinct inputs
    batch["input_ids"] = torch.randint(1000, vocab, (64, 12), generator=torch.Generator().manual_seed(12))
    fp32 = _run(make_session(text_export["fp32"], 1), batch)
    int8 = _run(make_session(text_export["int8"], 1), batch)
    margin = fp32 - fp32.mean(axis=0)  # what separates the inputs (random-init logits share a large offset)
    error = np.abs(int8 - fp32)
    assert error.max() > 0  # it really is another computation
    assert np.linalg.norm(int8 - fp32) < 0.1 * np.linalg.norm(margin)
    decided = np.abs(fp32[:, 0] - fp32[:, 1]) > 4 * error.max()
    assert decided.sum() >= 16  # enough inputs whose decision int8 could not flip ...
    assert (int8.argmax(1) == fp32.argmax(1))[decided].all()  # ... and it did not
    assert (int8.argmax(1) == fp32.argmax(1)).mean() >= 0.9


def test_onnx_adapter_scores_like_the_pytorch_model_in_task_evaluate(text_export, sentiment_dir):
    from kdforge.config import TaskConfig
    from kdforge.engine.predict import predict
    from kdforge.models.adapter import ModelAdapter
    from kdforge.tasks.base import build_task

    task = build_task(TaskConfig(name="csv", train_file=str(sentiment_dir / "train.csv"),
                                 dev_file=str(sentiment_dir / "dev.csv"), max_length=16))
    dev = task.split("dev")
    collate = task.collator(text_export["tokenizer"])
    torch_adapter = ModelAdapter(text_export["model"])
    onnx_adapter = OnnxAdapter(make_session(text_export["fp32"], threads=1))
    # batch size 7: batches padded to different lengths, one short last batch
    torch_logits, labels = predict(torch_adapter, dev, collate, batch_size=7)
    onnx_logits, onnx_labels = predict(onnx_adapter, dev, collate, batch_size=7)
    np.testing.assert_array_equal(onnx_labels, labels)
    np.testing.assert_allclose(onnx_logits, torch_logits, atol=FP32_ATOL, rtol=0)
    expected = task.evaluate(torch_adapter, dev, collate, batch_size=7)
    got = task.evaluate(onnx_adapter, dev, collate, batch_size=7)
    assert got.metrics.keys() == expected.metrics.keys() and got.metrics
    for name, value in expected.metrics.items():
        assert got.metrics[name] == pytest.approx(value, abs=1e-6), name
    assert got.ece == pytest.approx(expected.ece, abs=1e-5)


def test_onnx_forward_builds_inputs_once_per_batch_size(text_export):
    from kdforge.evaluation.latency import text_inputs

    tokenizer, model = text_export["tokenizer"], text_export["model"]
    calls: list[int] = []

    def make_inputs(batch_size: int) -> dict[str, torch.Tensor]:
        calls.append(batch_size)
        return text_inputs(tokenizer, batch_size, 16)

    forward = onnx_forward(make_session(text_export["int8"], threads=1), make_inputs)
    for batch_size in (1, 3, 1, 3, 3):
        (logits,) = forward(batch_size)
        assert logits.shape == (batch_size, 2)
    assert calls == [1, 3]
    with torch.no_grad():
        expected = model(**text_inputs(tokenizer, 3, 16)).logits.numpy()
    assert np.abs(forward(3)[0] - expected).max() < 0.05  # int8: close to the fp32 model


def test_vision_net_parity_with_dynamic_batch_and_image_size(tmp_path):
    from kdforge.evaluation.latency import image_inputs
    from kdforge.models.vision_nets import build_vision_net

    torch.manual_seed(0)
    net = build_vision_net("small_cnn", num_classes=10, in_channels=1)
    with torch.no_grad():  # non-trivial BatchNorm running statistics
        for _ in range(3):
            net(torch.randn(16, 1, 8, 8) * 2 + 0.5)
    net.eval()
    path = export_onnx(LoadedModel(net, None, "vision:small_cnn"), tmp_path / "net.onnx", image_size=8)
    assert net.training is False
    session = make_session(path, threads=1)
    (inp,) = session.get_inputs()
    assert inp.name == "pixel_values" and inp.type == "tensor(float)" and inp.shape[1] == 1
    for batch_size, size in [(1, 8), (6, 12)]:
        pixels = image_inputs(batch_size, (1, size, size), seed=batch_size)
        with torch.no_grad():
            expected = net(pixels).numpy()
        got = OnnxAdapter(session)({"pixel_values": pixels, "labels": torch.zeros(batch_size)}).logits.numpy()
        np.testing.assert_allclose(got, expected, atol=FP32_ATOL, rtol=0)
        np.testing.assert_allclose(onnx_forward(session, lambda bs, s=size: image_inputs(bs, (1, s, s), seed=bs))(
            batch_size)[0], expected, atol=FP32_ATOL, rtol=0)


def test_unsupported_models_and_missing_files_are_one_line_errors(tmp_path):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"previous")
    with pytest.raises(KDForgeError, match="LlamaForCausalLM .*only sequence classifiers"):
        export_onnx(LoadedModel(tiny_llama(50, 8), None, "lm"), target)
    with pytest.raises(KDForgeError, match="plain nn.Module has no Conv2d"):
        export_onnx(LoadedModel(torch.nn.Linear(4, 2), None, "mlp"), target)
    assert target.read_bytes() == b"previous"  # a failed export leaves the previous file alone
    with pytest.raises(KDForgeError, match="does not exist; export it first"):
        make_session(tmp_path / "absent.onnx")
    with pytest.raises(KDForgeError, match="cannot load ONNX model"):
        make_session(target)  # not an ONNX file
    with pytest.raises(KDForgeError, match="does not exist; export it first"):
        quantize_int8(tmp_path / "absent.onnx", tmp_path / "q.onnx")


def test_fused_graph_keeps_pytorchs_logits_and_int8_still_runs(text_export, tmp_path, kdlog, monkeypatch):
    """export.fuse: ONNX Runtime's transformer fusions replace the plain graph only when the logits stay."""
    import shutil

    from kdforge.deploy import onnx_fusion

    model, tokenizer = text_export["model"], text_export["tokenizer"]
    path = shutil.copy(text_export["fp32"], tmp_path / "fused.onnx")
    counts = onnx_fusion.fuse_transformer(path, LoadedModel(model, tokenizer, "tiny"))
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert counts.get("SkipLayerNormalization", 0) >= 4 and "SkipLayerNormalization" in ops  # 2 per layer
    batch = _text_batch(5, 23, len(tokenizer), seed=5)
    with torch.no_grad():
        expected = model(**batch).logits.numpy()
    np.testing.assert_allclose(_run(make_session(path, threads=1), batch), expected, atol=FP32_ATOL, rtol=0)
    int8 = quantize_int8(path, tmp_path / "fused.int8.onnx")
    np.testing.assert_allclose(_run(make_session(int8, threads=1), batch), expected, atol=0.15, rtol=0)

    # fusions that would move the logits are refused: the plain graph stays, byte for byte
    plain = shutil.copy(text_export["fp32"], tmp_path / "plain.onnx")
    before = plain.read_bytes()
    monkeypatch.setattr(onnx_fusion, "FUSION_TOLERANCE", -1.0)
    assert onnx_fusion.fuse_transformer(plain, LoadedModel(model, tokenizer, "tiny")) == {}
    assert plain.read_bytes() == before and "the plain graph stays" in kdlog[-1].getMessage()
