"""The Python API with the user's own nn.Modules and DataLoaders (scikit-learn digits, real data)."""

import pytest
import torch
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

import kdforge


@pytest.fixture(scope="module")
def digits_loaders():
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(y), generator=g)
    train, test = order[:1400], order[1400:]
    return (DataLoader(TensorDataset(x[train], y[train]), batch_size=64, shuffle=True),
            DataLoader(TensorDataset(x[test], y[test]), batch_size=128))


def mlp(hidden):
    return torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10))


def test_distiller_with_plain_modules(tmp_path, digits_loaders):
    train, test = digits_loaders
    torch.manual_seed(0)
    teacher = mlp(256)
    kdforge.Distiller(None, teacher, objectives=["ce"], output_dir=tmp_path / "t").fit(
        train, test, epochs=8, lr=3e-3, device="cpu")
    student = mlp(16)
    distiller = kdforge.Distiller(teacher, student, objectives=[
        {"name": "ce", "weight": 0.5}, {"name": "hinton_kd", "weight": 0.5, "temperature": 4.0}],
        output_dir=tmp_path / "s")
    before = distiller.evaluate(test)["accuracy"]
    state = distiller.fit(train, test, epochs=8, lr=3e-3, device="cpu")
    after = distiller.evaluate(test)["accuracy"]
    assert before < 0.3 and after > 0.85
    assert state.best_metric == pytest.approx(after)  # best epoch kept
    assert len(state.history) == 8 and "hinton_kd" in distiller.module.loss.names
    assert distiller.predict(test).shape == (len(test.dataset), 10)
    assert all(not p.requires_grad for p in distiller.module.frozen.parameters())
    assert not any(p is q for p in distiller.module.frozen.parameters() for q in distiller.student.parameters())


def rows(n: int) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.rand(n, 64, generator=g), torch.randint(0, 10, (n,), generator=g))


def seen_by_fit(tmp_path, loader, **settings):
    """The examples of every step of one epoch of ``fit`` (recorded by a wrapping collate)."""
    seen: list[list[int]] = []
    dataset = loader.dataset

    def collate(examples):
        seen.append([int((dataset.tensors[0] == e[0]).all(1).nonzero()[0]) for e in examples])
        return torch.utils.data.default_collate(examples)

    loader = DataLoader(dataset, batch_size=loader.batch_size, sampler=loader.sampler if settings.get("sampler") else
                        None, shuffle=settings.get("shuffle", False), drop_last=settings.get("drop_last", False),
                        collate_fn=collate)
    state = kdforge.Distiller(None, mlp(8), objectives=["ce"], output_dir=tmp_path).fit(
        loader, epochs=1, lr=1e-3, device="cpu", select_best=False)
    return seen, state


def test_fit_honours_the_loaders_batch_size_order_and_drop_last(tmp_path):
    seen, state = seen_by_fit(tmp_path / "a", DataLoader(rows(20), batch_size=8), shuffle=False, drop_last=True)
    assert state.step == 2 and seen == [list(range(8)), list(range(8, 16))]  # in order, the 4-row tail dropped
    seen, state = seen_by_fit(tmp_path / "b", DataLoader(rows(20), batch_size=8), shuffle=True)
    assert state.step == 3 and sorted(sum(seen, [])) == list(range(20)) and sum(seen, []) != list(range(20))


def test_fit_trains_on_a_subset_samplers_rows_only(tmp_path):
    sampler = torch.utils.data.SubsetRandomSampler([3, 5, 7, 11, 13, 17])
    loader = DataLoader(rows(40), batch_size=4, sampler=sampler)
    seen, state = seen_by_fit(tmp_path, loader, sampler=True)
    assert state.step == 2 and sorted(sum(seen, [])) == [3, 5, 7, 11, 13, 17]


def test_fit_refuses_a_sampler_it_cannot_reproduce(tmp_path):
    weighted = DataLoader(rows(20), batch_size=4, sampler=torch.utils.data.WeightedRandomSampler([1.0] * 20, 20))
    batched = DataLoader(rows(20), batch_sampler=torch.utils.data.BatchSampler(range(20), 5, False))
    for loader, what in ((weighted, "sampler (WeightedRandomSampler)"), (batched, "custom batch_sampler")):
        with pytest.raises(kdforge.KDForgeError, match=what.replace("(", r"\(").replace(")", r"\)")):
            kdforge.Distiller(None, mlp(8), objectives=["ce"], output_dir=tmp_path).fit(loader, epochs=1, device="cpu")


SCRIPT = """
import torch, kdforge
from torch.utils.data import DataLoader, TensorDataset
g = torch.Generator().manual_seed(0)
data = TensorDataset(torch.rand(32, 64, generator=g), torch.randint(0, 10, (32,), generator=g))
net = torch.nn.Sequential(torch.nn.Linear(64, 8), torch.nn.ReLU(), torch.nn.Linear(8, 10))
kdforge.Distiller(None, net, objectives=["ce"], output_dir=OUT).fit(
    DataLoader(data, batch_size=8, shuffle=True), DataLoader(data, batch_size=8), epochs=2, device="cpu")
"""


def test_fit_in_a_plain_script_prints_each_epoch_and_the_kept_one(tmp_path):
    import os
    import subprocess
    import sys

    code = SCRIPT.replace("OUT", repr(str(tmp_path / "run")))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("[kdforge]")]
    assert any("distill epoch 1/2" in line and "accuracy" in line for line in lines)
    assert any("distill epoch 2/2" in line for line in lines) and any("kept epoch" in line for line in lines)


@pytest.fixture(scope="module")
def distilled_digits(tmp_path_factory, digits_loaders):
    """A teacher and a student distilled on digits, the best epoch kept on a validation loader."""
    train, test = digits_loaders
    val = DataLoader(torch.utils.data.Subset(train.dataset, range(300)), batch_size=128)
    torch.manual_seed(0)
    teacher = mlp(128)
    kdforge.Distiller(None, teacher, objectives=["ce"], output_dir=tmp_path_factory.mktemp("t")).fit(
        train, val, epochs=4, lr=3e-3, device="cpu")
    distiller = kdforge.Distiller(teacher, mlp(16), output_dir=tmp_path_factory.mktemp("s"))
    distiller.fit(train, val, epochs=4, lr=3e-3, device="cpu")
    return distiller, teacher, train, val, test


def by_hand(model, loader):
    from kdforge.problems.calibration import expected_calibration_error, softmax

    x, y = loader.dataset.tensors
    with torch.no_grad():
        logits = model(x).numpy()
    return (logits.argmax(1) == y.numpy()).mean(), expected_calibration_error(softmax(logits), y.numpy())


def test_report_puts_teacher_beside_student_and_their_onnx_forms(tmp_path, distilled_digits):
    distiller, teacher, train, val, test = distilled_digits
    report = distiller.report(test, output_dir=tmp_path / "report",
                              eval_config=kdforge.api.EvalConfig(latency_repeats=3, latency_warmup=1))
    for name, model in (("teacher", teacher), ("student", distiller.student)):
        accuracy, ece = by_hand(model, test)
        assert report.forms[name].metrics["accuracy"] == pytest.approx(accuracy)
        assert report.forms[name].ece == pytest.approx(ece)
        assert report.forms[name].params == sum(p.numel() for p in model.parameters())
    assert set(report.forms) == {"teacher", "student", "teacher onnx fp32", "student onnx fp32", "student onnx int8"}
    onnx_accuracy = report.forms["student onnx fp32"].metrics["accuracy"]
    assert onnx_accuracy == pytest.approx(report.student.metrics["accuracy"], abs=1 / len(test.dataset))
    labels = train.dataset.tensors[1]
    majority = int(labels.bincount().argmax())
    assert report.baseline.metrics["accuracy"] == pytest.approx((test.dataset.tensors[1] == majority).float().mean())
    for form in report.forms.values():  # every form timed interleaved on the loader's first batch (128 rows)
        assert set(form.latency["batch_sizes"]) == {"128"} and form.latency["interleaved"]
    assert report.forms["student onnx int8"].size_mb < report.forms["student onnx fp32"].size_mb
    assert (tmp_path / "report" / "report.html").is_file() and (tmp_path / "report" / "metrics.json").is_file()
    assert "student / teacher" in report.table and "student onnx int8" in report.table
    assert "reported on: the loader given to report (397 rows)" in report.table
    assert "best epoch selected on: the eval_loader of fit (300 rows)" in report.table
    assert "optimistic" not in report.table


def test_report_on_the_selection_loader_says_the_score_is_optimistic(tmp_path, distilled_digits):
    distiller, _, _, val, _ = distilled_digits
    report = distiller.report(val, example_inputs=val.dataset[0][0][None], onnx=False, output_dir=tmp_path,
                              eval_config=kdforge.api.EvalConfig(latency_repeats=2, latency_warmup=0))
    assert "(the same split: the score is optimistic)" in report.table
    assert set(report.forms) == {"teacher", "student"}
    assert set(report.student.latency["batch_sizes"]) == {"1"}  # timed on the example given


def test_a_module_without_onnx_support_is_reported_with_the_reason(tmp_path, distilled_digits):
    class Branching(torch.nn.Module):  # a data-dependent branch: torch.export cannot capture it soundly
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, inputs):
            return self.inner(inputs) if float(inputs.sum()) > 0 else -self.inner(inputs)

    distiller, teacher, _, _, test = distilled_digits
    report = kdforge.Distiller(teacher, Branching(distiller.student), objectives=["ce"]).report(
        test, output_dir=tmp_path, eval_config=kdforge.api.EvalConfig(latency_repeats=2, latency_warmup=0))
    assert set(report.forms) == {"teacher", "student", "teacher onnx fp32"}
    assert len(report.notes) == 1 and report.notes[0].startswith("student: no ONNX form (cannot export Branching")
    assert report.notes[0] in report.table


def test_save_writes_a_plain_module_as_safetensors_and_its_class(tmp_path, distilled_digits):
    distiller, _, _, _, test = distilled_digits
    folder = distiller.save(tmp_path / "student")
    assert sorted(p.name for p in folder.iterdir()) == ["kdforge_module.json", "model.safetensors"]
    again = kdforge.load_student_weights(folder, mlp(16))
    x = test.dataset.tensors[0]
    torch.testing.assert_close(again(x), distiller.student(x))
    with pytest.raises(kdforge.KDForgeError, match="holds a torch.nn.modules.container:Sequential, not a"):
        kdforge.load_student_weights(folder, torch.nn.Linear(64, 10))


def test_save_writes_a_hugging_face_student_with_save_pretrained(tmp_path, tiny_teacher_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    student = AutoModelForSequenceClassification.from_pretrained(tiny_teacher_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    folder = kdforge.Distiller(None, student, objectives=["ce"]).save(tmp_path / "hf", tokenizer=tokenizer)
    loaded = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    batch = AutoTokenizer.from_pretrained(folder)(["a fine film", "dull"], padding=True, return_tensors="pt")
    torch.testing.assert_close(loaded(**batch).logits, student.eval()(**batch).logits)
