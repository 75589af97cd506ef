"""Static int8 (export.int8_mode static / best) on tiny random-init models: the file is several times smaller,
every convolution of a vision net is quantised, the logits stay close to fp32 on inputs like the calibration
data, calibration reads training rows only, int8_mode best keeps the form its rule says, bad settings are
one-line errors."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
import torch

from kdforge.config import validate_config
from kdforge.deploy.calibration import calibration_rows
from kdforge.deploy.onnx_export import export_onnx
from kdforge.deploy.onnx_fusion import fuse_transformer
from kdforge.deploy.onnx_runtime import OnnxAdapter, make_session
from kdforge.deploy.quantize import post_gelu_matmuls, quantize_static_int8
from kdforge.errors import KDForgeError
from kdforge.evaluation import int8_choice
from kdforge.models.loading import LoadedModel
from kdforge.models.vision_nets import build_vision_net
from tests.helpers import tiny_bert

pytestmark = pytest.mark.usefixtures("one_thread")

EIGHT_BIT = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
#: ||int8 - fp32|| / ||fp32 - its mean over the inputs||: random-init nets' logits differ little between
#: inputs (a spread of ~0.07 for resnet8), so the quantisation noise is measured against that spread
MAX_RELATIVE_ERROR = 0.15


def _images(count: int, generator: torch.Generator) -> np.ndarray:
    return torch.randn(count, 3, 32, 32, generator=generator).numpy()


@pytest.fixture(scope="module")
def vision_static(tmp_path_factory):
    """resnet8 with batch-norm statistics of standard-normal images (so that the exporter's folded
    convolutions are not the identity), quantised on 4 calibration batches of such images."""
    torch.manual_seed(0)
    net = build_vision_net("resnet8", 10).train()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(5):
            net(torch.from_numpy(_images(32, generator)))
    net.eval()
    folder = tmp_path_factory.mktemp("static_vision")
    fp32 = export_onnx(LoadedModel(net, None, "resnet8"), folder / "model.onnx")
    batches = [{"pixel_values": _images(32, generator)} for _ in range(4)]
    int8 = quantize_static_int8(fp32, folder / "model.int8.onnx", iter(batches))
    return {"net": net, "fp32": fp32, "int8": int8, "generator": generator, "folder": folder}


def _producers(graph) -> dict:
    return {out: node for node in graph.node for out in node.output}


def _close(fp32: np.ndarray, int8: np.ndarray) -> float:
    assert np.abs(int8 - fp32).max() > 0  # it really is another computation
    return float(np.linalg.norm(int8 - fp32) / np.linalg.norm(fp32 - fp32.mean(axis=0)))


def test_static_int8_quantises_every_convolution_of_a_vision_net(vision_static):
    graph = onnx.load(str(vision_static["int8"])).graph
    producers, initializers = _producers(graph), {t.name: t for t in graph.initializer}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert len(convs) >= 7  # resnet8: stem + 3 stages of 2 convs (+ projection shortcuts)
    for conv in convs:  # activation and weight both come through DequantizeLinear: QLinearConv at load time
        activation, weight = producers[conv.input[0]], producers[conv.input[1]]
        assert activation.op_type == weight.op_type == "DequantizeLinear", conv.name
        assert initializers[weight.input[0]].data_type == onnx.TensorProto.INT8
        assert len(initializers[weight.input[1]].dims) == 1  # per-channel scales
    assert any(n.op_type == "QuantizeLinear" for n in graph.node)
    assert [i.name for i in graph.input] == ["pixel_values"] and [o.name for o in graph.output] == ["logits"]


def test_static_int8_vision_file_is_smaller_and_its_logits_stay_close(vision_static):
    fp32_bytes, int8_bytes = vision_static["fp32"].stat().st_size, vision_static["int8"].stat().st_size
    # 8-bit weights; resnet8's 78k weights are small beside its per-channel scales, int32 biases and graph
    # (resnet20: 3.3x, resnet32: 3.2x; MiniLM-L6: 3.8x)
    assert fp32_bytes / int8_bytes > 2.5
    graph = onnx.load(str(vision_static["int8"])).graph
    eight_bit = sum(int(np.prod(t.dims)) for t in graph.initializer if t.data_type in EIGHT_BIT)
    assert eight_bit > 0.95 * sum(p.numel() for p in vision_static["net"].parameters() if p.dim() > 1)
    held_out = {"pixel_values": _images(64, vision_static["generator"])}  # like the calibration images
    fp32 = make_session(vision_static["fp32"], 1).run(None, held_out)[0]
    int8 = make_session(vision_static["int8"], 1).run(None, held_out)[0]
    assert _close(fp32, int8) < MAX_RELATIVE_ERROR
    assert (int8.argmax(1) == fp32.argmax(1)).mean() >= 0.9


def _text_batch(batch_size: int, seq_len: int, vocab: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    ids = torch.randint(1000, vocab, (batch_size, seq_len), generator=generator)
    mask = torch.ones_like(ids)
    mask[1::2, seq_len // 2:] = 0  # every other row padded after half its length
    return {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def test_static_int8_of_a_fused_text_encoder(tmp_path, tokenizer_dir):
    """The fused graph (ONNX Runtime contrib ops) quantises; each feed-forward block's second projection (fed by
    the GELU) stays fp32, every other weight MatMul reads int8 weights; the logits stay close."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = tiny_bert(len(tokenizer), layers=2, seed=3).eval()
    loaded = LoadedModel(model, tokenizer, "tiny")
    plain = export_onnx(loaded, tmp_path / "plain.onnx", seq_len=16)
    fused = shutil.copy(plain, tmp_path / "fused.onnx")
    assert fuse_transformer(fused, loaded).get("BiasGelu") == 2
    assert post_gelu_matmuls(onnx.load(str(plain)).graph) == post_gelu_matmuls(onnx.load(str(fused)).graph)
    generator = torch.Generator().manual_seed(0)
    batches = [{k: v.numpy() for k, v in _text_batch(16, 12 + 4 * i, len(tokenizer), generator).items()}
               for i in range(4)]
    int8 = quantize_static_int8(fused, tmp_path / "fused.int8.onnx", iter(batches))

    assert 3.0 < fused.stat().st_size / int8.stat().st_size < 4.2
    graph = onnx.load(str(int8)).graph
    producers, initializers = _producers(graph), {t.name for t in graph.initializer}
    weighted = [n for n in graph.node if n.op_type == "MatMul" and
                (n.input[1] in initializers or producers[n.input[1]].op_type == "DequantizeLinear")]
    kept = {n.name for n in weighted if n.input[1] in initializers}
    assert kept == set(post_gelu_matmuls(onnx.load(str(fused)).graph)) and len(kept) == 2
    assert len(weighted) - len(kept) >= 10  # q, k, v, attention output, intermediate: 5 per layer
    assert {"SkipLayerNormalization", "BiasGelu"} <= {n.op_type for n in graph.node}

    held_out = _text_batch(64, 20, len(tokenizer), generator)
    fp32_logits = OnnxAdapter(make_session(fused, 1))(held_out).logits.numpy()
    int8_logits = OnnxAdapter(make_session(int8, 1))(held_out).logits.numpy()
    assert _close(fp32_logits, int8_logits) < 0.1  # the bound of the dynamic int8 test
    assert (int8_logits.argmax(1) == fp32_logits.argmax(1)).mean() >= 0.9


def test_calibration_rows_are_a_fixed_sample():
    rows = calibration_rows(100, 30)
    assert rows == calibration_rows(100, 30) and rows == sorted(set(rows)) and len(rows) == 30
    assert all(0 <= i < 100 for i in rows) and rows != list(range(30))
    assert calibration_rows(5, 30) == [0, 1, 2, 3, 4]  # fewer training rows than asked: all of them


def test_static_int8_without_calibration_data_is_one_line(tmp_path, vision_static):
    for source, error in ((tmp_path / "absent.onnx", "does not exist; export it first"),
                          (vision_static["fp32"], "no calibration batches were given")):
        with pytest.raises(KDForgeError, match=error) as info:
            quantize_static_int8(source, tmp_path / "q.onnx", iter([]))
        assert "\n" not in str(info.value)
    assert not list(tmp_path.iterdir())  # no temporary file left


# ------------------------------------------------------------------ the run's int8 file (write_exports)


@pytest.fixture
def job(job_tree, tokenizer_dir, tmp_path):
    """A config with export.onnx/int8 and a validation split, its task, tiny teacher and student, a run folder."""
    from transformers import AutoTokenizer

    from kdforge.run_folder import RunFolder
    from kdforge.tasks.base import build_task

    def make(**export):
        tree = {**job_tree, "task": {**job_tree["task"], "validation": 0.25},
                "export": {"onnx": True, "int8": True, **export}}
        config = validate_config(tree)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        teacher, student = (LoadedModel(tiny_bert(len(tokenizer), layers=n, seed=n).eval(), tokenizer, f"tiny{n}")
                            for n in (2, 1))
        return config, build_task(config.task), teacher, student, RunFolder(tmp_path / "run")

    return make


def _spy_splits(task, monkeypatch) -> list[str]:
    asked: list[str] = []
    split = task.split
    monkeypatch.setattr(task, "split", lambda name: asked.append(name) or split(name))
    return asked


def test_static_calibrates_on_training_rows_only(job, monkeypatch):
    from kdforge.evaluation.run_report import write_exports

    config, task, teacher, student, run = job(int8_mode="static", calibration_rows=40)
    train = task.split("train")
    collated: list[dict] = []
    collator = task.collator
    monkeypatch.setattr(task, "collator", lambda tokenizer, train=False: (
        lambda rows: collated.extend(rows) or collator(tokenizer, train)(rows)))
    asked = _spy_splits(task, monkeypatch)
    paths = write_exports(config, teacher, student, run, task)

    assert set(asked) == {"train"}  # never the validation or the reported split
    assert collated == [train[i] for i in calibration_rows(len(train), 40)]
    graph = onnx.load(str(paths["student onnx int8"])).graph
    assert any(n.op_type == "QuantizeLinear" for n in graph.node)
    record = int8_choice.read_int8_record(paths["student onnx int8"])
    assert record == {"requested": "static", "mode": "static",
                      "calibration": {"split": "train", "rows": 40, "seed": 0}}
    assert int8_choice.int8_line(record) == "student onnx int8: static int8, calibrated on 40 train rows (seed 0)"


def test_best_measures_on_the_validation_split_and_keeps_what_its_rule_says(job, monkeypatch):
    from kdforge.evaluation.run_report import notes, write_exports

    config, task, teacher, student, run = job(int8_mode="best", calibration_rows=32)
    asked = _spy_splits(task, monkeypatch)
    paths = write_exports(config, teacher, student, run, task)
    assert set(asked) == {"train", "validation"}  # calibration, selection; the reported split is never read
    record = int8_choice.read_int8_record(paths["student onnx int8"])
    selection = record["selection"]
    assert record["requested"] == "best" and selection["split"] == "validation"
    assert set(selection["scores"]) == {"fp32", "dynamic", "static"} and selection["batch_size"] == 4
    assert (selection["kept"], selection["why"]) == int8_choice.choose_int8(
        selection["drops"], selection["speedup"]["static"], 0.01)
    assert record["mode"] == selection["kept"]
    assert sorted(p.name for p in run.exports.iterdir()) == ["student.int8.json", "student.int8.onnx",
                                                            "student.onnx", "teacher.onnx"]  # candidates gone
    assert notes({"int8": record}) == [int8_choice.int8_line(record)]
    assert "kept by export.int8_mode best on the validation split" in int8_choice.int8_line(record)

    # the kept file is the one the rule names (measurements replaced by chosen ones)
    measured = {k: v for k, v in selection.items() if k not in ("max_drop", "kept", "why")}
    for drops, low, kept, op in (({"dynamic": 0.0, "static": 0.005}, 1.2, "static", "QuantizeLinear"),
                                 ({"dynamic": 0.0, "static": 0.05}, 1.2, "dynamic", "DynamicQuantizeLinear")):
        monkeypatch.setattr(int8_choice, "measure_candidates", lambda *a, drops=drops, low=low: {
            **measured, "drops": drops, "speedup": {"static": {"ratio": low + 0.1, "low": low, "high": low + 0.2}}})
        write_exports(config, teacher, student, run, task)
        assert int8_choice.read_int8_record(paths["student onnx int8"])["selection"]["kept"] == kept
        assert op in {n.op_type for n in onnx.load(str(paths["student onnx int8"])).graph.node}


@pytest.mark.parametrize(("drops", "low", "kept", "why"), [
    ({"dynamic": 0.0, "static": 0.004}, 1.3, "static", "static measurably faster"),
    ({"dynamic": 0.0, "static": 0.004}, 0.9, "dynamic", "static not measurably faster"),
    ({"dynamic": -0.01, "static": 0.02}, 3.0, "dynamic", "static dropped 0.02 from fp32 (> 0.01)"),
    ({"dynamic": 0.03, "static": 0.0}, 0.5, "static", "dynamic dropped 0.03"),
    ({"dynamic": 0.05, "static": 0.02}, 0.5, "static", "neither within 0.01"),
])
def test_best_rule(drops, low, kept, why):
    got, reason = int8_choice.choose_int8(drops, {"ratio": low + 0.1, "low": low, "high": low + 0.2}, 0.01)
    assert got == kept and why in reason


@pytest.mark.parametrize(("export", "task", "error"), [
    ({"onnx": True, "int8_mode": "static"}, {}, "export.int8_mode static chooses how the int8 student is made"),
    ({"onnx": True, "int8": True, "int8_mode": "static", "calibration_rows": 0}, {}, "calibration_rows"),
    ({"onnx": True, "int8": True, "int8_mode": "best"}, {}, "set task.validation"),
    ({"onnx": True, "int8": True, "int8_mode": "best", "int8_max_drop": -1}, {"validation": 0.1}, "int8_max_drop"),
    ({"onnx": True, "int8": True, "int8_mode": "fastest"}, {}, "int8_mode"),
])
def test_bad_int8_settings_are_one_line_errors(job_tree, export, task, error):
    with pytest.raises(KDForgeError, match=error) as info:
        validate_config({**job_tree, "task": {**job_tree["task"], **task}, "export": export})
    assert "\n" not in str(info.value)


def test_a_vision_runs_static_int8_quantises_its_convolutions(tmp_path, monkeypatch):
    """The run's path for an image task: the collated training images calibrate, every convolution is int8."""
    from kdforge.evaluation.run_report import write_exports
    from kdforge.run_folder import RunFolder
    from kdforge.tasks.base import build_task
    from tests.test_vision import cifar_members, write_zip

    monkeypatch.setenv("KDFORGE_CACHE", str(tmp_path / "cache"))
    data = write_zip(tmp_path / "cifar10-jpeg.zip", cifar_members(train=4, test=2))
    config = validate_config({"task": {"name": "cifar10", "data_dir": str(data)},
                              "teacher": {"model": "vision:resnet8"}, "student": {"model": "vision:resnet8"},
                              "export": {"onnx": True, "int8": True, "int8_mode": "static", "calibration_rows": 16},
                              "output_dir": str(tmp_path / "run")})
    task = build_task(config.task)
    train_rows = len(task.split("train"))
    asked = _spy_splits(task, monkeypatch)
    torch.manual_seed(0)
    teacher, student = (LoadedModel(build_vision_net("resnet8", 10).eval(), None, "resnet8") for _ in range(2))
    paths = write_exports(config, teacher, student, RunFolder(tmp_path / "run"), task)
    assert set(asked) == {"train"}
    graph = onnx.load(str(paths["student onnx int8"])).graph
    producers = _producers(graph)
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert convs and all(producers[c.input[1]].op_type == "DequantizeLinear" for c in convs)
    assert train_rows < 16  # fewer training images than calibration_rows: all of them calibrate
    assert int8_choice.read_int8_record(paths["student onnx int8"])["calibration"]["rows"] == train_rows
