"""The student's model card: Hub metadata that huggingface_hub reads back, and a folder that the
plain ``transformers.pipeline`` loads and runs (the path a user takes after ``kdforge distill``)."""

import re

import pytest
import torch
from huggingface_hub import ModelCard

from kdforge.deploy.model_card import write_model_card
from tests.helpers import tiny_bert

LABELS = ["negative", "positive"]


@pytest.fixture
def student_dir(tmp_path, tokenizer_dir):
    """A tiny random BERT classifier with id2label/label2id, saved with its tokenizer as kdforge exports it."""
    from transformers import AutoTokenizer

    from kdforge.models.saving import write_pretrained

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = tiny_bert(len(tokenizer), layers=1, seed=3)
    model.config.id2label = dict(enumerate(LABELS))
    model.config.label2id = {name: i for i, name in enumerate(LABELS)}
    return write_pretrained(tmp_path / "student", model, tokenizer)


def card_args(**changes):
    args = dict(task_name="glue/sst2", metrics={"accuracy": 0.875, "f1": 0.8, "ece": float("nan")},
                teacher_metrics={"accuracy": 0.92, "f1": 0.9}, main_metric="accuracy",
                teacher_source="runs/sst2/teacher/model", objectives=["ce", "hinton_kd"],
                student_description="BERT, layers [0, 5] of the teacher (2 of 6)", params=1_234_567,
                size_mb=4.9, latency_ms={"1": 2.5, "32": {"median_ms": 10.25}}, label_names=LABELS,
                base_model="google-bert/bert-base-uncased", command="kdforge distill configs/glue/sst2.yaml")
    return {**args, **changes}


def test_card_metadata_reads_back(student_dir):
    path = write_model_card(student_dir, **card_args())
    assert path == student_dir / "README.md"
    card = ModelCard.load(path)
    data = card.data
    got = {r.metric_type: r.metric_value for r in data.eval_results}
    assert got == {"accuracy": 0.875, "f1": 0.8}  # the non-finite ECE is left out
    first = data.eval_results[0]
    assert (first.task_type, first.dataset_type, first.dataset_config, first.dataset_split) == (
        "text-classification", "nyu-mll/glue", "sst2", "validation")
    assert data.pipeline_tag == "text-classification" and data.library_name == "transformers"
    assert {"knowledge-distillation", "kdforge"} <= set(data.tags)
    assert data.datasets == ["nyu-mll/glue"] and data.metrics == ["accuracy", "f1"]
    assert data.base_model == "google-bert/bert-base-uncased"
    text = card.text
    # retention = 100 * student / teacher: 0.875 / 0.92 -> 95.1%, 0.8 / 0.9 -> 88.9%
    assert re.search(r"\| \*\*accuracy\*\* \(main\) \| 0\.8750 \| 0\.9200 \| 95\.1% \|", text)
    assert "| f1 | 0.8000 | 0.9000 | 88.9% |" in text
    assert "| 32 | 10.25 |" in text and "1.23 M parameters" in text
    assert "kdforge distill configs/glue/sst2.yaml" in text and "`hinton_kd`" in text
    assert "1 = `positive`" in text


def test_local_base_model_is_left_out_of_the_metadata(student_dir):
    data = ModelCard.load(write_model_card(student_dir, **card_args(base_model=str(student_dir),
                                                                    task_name="csv"))).data
    assert data.base_model is None and data.datasets is None
    assert data.eval_results[0].dataset_type == "csv"


def test_pipeline_loads_the_folder_and_the_card_snippet_runs(student_dir):
    from transformers import pipeline

    card_path = write_model_card(student_dir, **card_args())
    classifier = pipeline("text-classification", model=str(student_dir))
    out = classifier("the movie was really great")
    assert out[0]["label"] in LABELS and 0 <= out[0]["score"] <= 1
    # the README's own snippet, pointed at this folder, runs as written
    code = re.search(r"```python\n(.*?)```", card_path.read_text(), re.S).group(1)
    scope: dict = {}
    exec(code.replace("path/to/this/folder", str(student_dir)), scope)
    assert scope["model"].config.id2label == dict(enumerate(LABELS))


def test_vision_export_card(tmp_path):
    from kdforge.deploy.export import export_model
    from kdforge.models.loading import LoadedModel
    from kdforge.models.vision_nets import build_vision_net

    torch.manual_seed(0)
    net = build_vision_net("small_cnn", num_classes=10).eval()
    folder = export_model(LoadedModel(net, None, "vision:small_cnn"), tmp_path / "student")
    card_path = write_model_card(folder, **card_args(task_name="cifar10", base_model=None, label_names=None))
    data = ModelCard.load(card_path).data
    assert data.pipeline_tag == "image-classification" and data.datasets == ["uoft-cs/cifar10"]
    assert data.eval_results[0].dataset_split == "test"
    code = re.search(r"```python\n(.*?)```", card_path.read_text(), re.S).group(1)
    scope: dict = {}
    exec(code.replace("path/to/this/folder", str(folder)), scope)
    with torch.no_grad():
        expected = net(torch.zeros(1, 3, 32, 32))
        assert torch.allclose(scope["model"](torch.zeros(1, 3, 32, 32)), expected)


def onnx_snippet(card_text: str) -> str:
    """The card's onnxruntime snippet (the code block of its 'ONNX and int8' section)."""
    return re.search(r"### ONNX and int8\n.*?```python\n(.*?)```", card_text, re.S).group(1)


def deployment(**changes):
    from kdforge.deploy.model_card import Deployment

    forms = {"student": {"metrics": {"accuracy": 0.875}, "size_mb": 4.9, "latency": {"batch_sizes": {"1": {
                 "median_ms": 2.5}}}},
             "student onnx int8": {"metrics": {"accuracy": 0.87}, "size_mb": 1.3, "latency": {"batch_sizes": {"1": {
                 "median_ms": 1.04}}}}}
    speedups = {"student": {"1": "2.50x [2.31-2.70]"}, "student onnx int8": {"1": "6.00x [5.50-6.40]"}}
    args = dict(forms=forms, speedups=speedups,
                noise="latency noisy: machine load 5.0 on 2 CPUs — re-measure on an idle machine",
                files={"student onnx int8": "student.int8.onnx"},
                timed_on="sequence length 64 tokens, batch sizes 1 and 32",
                hardware="AMD EPYC 7B13 (2 logical CPUs), 1 torch thread", max_length=64)
    return Deployment(**{**args, **changes})


def test_card_says_where_the_student_was_timed_its_speedup_and_the_noise(student_dir):
    plan = deployment()
    text = ModelCard.load(write_model_card(student_dir, **card_args(deployment=plan))).text
    assert ("timed at sequence length 64 tokens, batch sizes 1 and 32 on AMD EPYC 7B13 (2 logical CPUs), 1 torch "
            "thread") in text
    assert "| 1 | 2.50 | 2.50x [2.31-2.70] |" in text  # median ms, speedup over the teacher [95% CI]
    assert f"**Warning: {plan.noise}**" in text
    assert "| student onnx int8 | `student.int8.onnx` | 0.8700 | 1.3 | 1.04 | 6.00x [5.50-6.40] |" in text
    quiet = deployment(noise=None, files={})
    text = ModelCard.load(write_model_card(student_dir, **card_args(deployment=quiet))).text
    assert "Warning" not in text and "ONNX and int8" not in text and "Deployment forms" not in text


def test_the_cards_onnx_snippet_runs_the_int8_and_fp32_files(student_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from kdforge.deploy.onnx_export import export_onnx
    from kdforge.deploy.quantize import quantize_int8
    from kdforge.models.loading import LoadedModel

    model = AutoModelForSequenceClassification.from_pretrained(student_dir).eval()
    exports = tmp_path / "exports"
    export_onnx(LoadedModel(model, AutoTokenizer.from_pretrained(student_dir)), exports / "student.onnx")
    quantize_int8(exports / "student.onnx", exports / "student.int8.onnx")
    plan = deployment(files={"student onnx int8": "student.int8.onnx", "student onnx fp32": "student.onnx"})
    code = onnx_snippet(write_model_card(student_dir, **card_args(deployment=plan)).read_text())
    assert "student.int8.onnx" in code and "max_length=64" in code  # the int8 file: the form to ship
    code = code.replace("path/to/this/folder", str(student_dir)).replace("path/to/exports", str(exports))
    scope: dict = {}
    exec(code, scope)
    assert scope["logits"].shape == (1, 2) and scope["predicted"].shape == (1,)
    exec(code.replace("student.int8.onnx", "student.onnx"), scope)  # the fp32 file: PyTorch's logits
    with torch.no_grad():
        expected = model(**{k: torch.from_numpy(v) for k, v in scope["batch"].items()}).logits.numpy()
    assert abs(scope["logits"] - expected).max() < 1e-4


def test_a_vision_cards_onnx_snippet_feeds_the_input_shape(tmp_path):
    from kdforge.deploy.export import export_model
    from kdforge.deploy.onnx_export import export_onnx
    from kdforge.models.loading import LoadedModel
    from kdforge.models.vision_nets import build_vision_net

    torch.manual_seed(0)
    net = build_vision_net("small_cnn", num_classes=10).eval()
    folder = export_model(LoadedModel(net, None, "vision:small_cnn"), tmp_path / "student")
    export_onnx(LoadedModel(net, None, "vision:small_cnn"), tmp_path / "exports" / "student.onnx")
    plan = deployment(files={"student onnx fp32": "student.onnx"}, image_shape=[3, 32, 32], max_length=None,
                      timed_on="images 3x32x32, batch sizes 1 and 32")
    card = write_model_card(folder, **card_args(task_name="cifar10", base_model=None, label_names=None,
                                                deployment=plan)).read_text()
    assert "images 3x32x32" in card
    code = onnx_snippet(card).replace("path/to/exports", str(tmp_path / "exports"))
    assert "np.random.rand(1, 3, 32, 32)" in code and "AutoTokenizer" not in code
    scope: dict = {}
    exec(code, scope)
    with torch.no_grad():
        expected = net(torch.from_numpy(scope["images"])).numpy()
    assert abs(scope["logits"] - expected).max() < 1e-4
