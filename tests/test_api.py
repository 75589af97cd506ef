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
    return (DataLoader(TensorDataset(x[train], y[train]), batch_size=64),
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
