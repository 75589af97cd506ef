"""Teacher-output cache: exact losses, keys that change with teacher/data/settings, fp16, top-k, hidden states."""

import copy
import math

import pytest
import torch

from kdforge.config import ObjectiveConfig
from kdforge.models.adapter import ModelAdapter
from kdforge.objectives.base import Objective, Progress
from kdforge.objectives.composite import WeightedLoss
from kdforge.recipes.teacher_cache import (
    CacheSpec,
    IndexedCollator,
    IndexedDataset,
    TeacherCache,
    cache_key,
    densify,
    sparsify,
)
from tests.helpers import offline_step, tiny_bert


class Rows(torch.utils.data.Dataset):
    """Token rows of different lengths (padding differs from batch to batch)."""

    def __init__(self, n):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(5, 100, (n, 8), generator=g)
        self.lengths = torch.randint(3, 9, (n,), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i, : self.lengths[i]], "label": i % 2}


def collate(examples):
    length = max(len(e["input_ids"]) for e in examples)
    ids = torch.zeros(len(examples), length, dtype=torch.long)
    mask = torch.zeros(len(examples), length, dtype=torch.long)
    for row, e in enumerate(examples):
        ids[row, : len(e["input_ids"])] = e["input_ids"]
        mask[row, : len(e["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([e["label"] for e in examples])}


def kd_loss():
    return WeightedLoss.from_config([ObjectiveConfig(name="ce", weight=0.5),
                                     ObjectiveConfig(name="hinton_kd", weight=0.5, temperature=2.0)])


def models():
    return tiny_bert(100, layers=2, seed=0), tiny_bert(100, layers=1, seed=1).eval()


def test_cached_teacher_outputs_give_the_same_losses(tmp_path):
    teacher, student = models()
    data = Rows(12)
    cache = TeacherCache.load_or_build(teacher, data, collate, "rows-v1", batch_size=5, folder=tmp_path)
    plain = offline_step(ModelAdapter(student), kd_loss(), ModelAdapter(teacher))
    cached = offline_step(ModelAdapter(student), kd_loss(), cache=cache)
    batch = IndexedCollator(collate)([IndexedDataset(data)[i] for i in (3, 7, 11)])
    (loss_a, terms_a), (loss_b, terms_b) = plain(batch, Progress()), cached(batch, Progress())
    assert torch.allclose(loss_a, loss_b, atol=1e-6)
    assert terms_a == pytest.approx(terms_b, abs=1e-6)
    # reused from disk; a different teacher, data or setting gives a different key
    again = TeacherCache.load_or_build(teacher, data, collate, "rows-v1", folder=tmp_path, build=False)
    assert torch.equal(again.store["logits"], cache.store["logits"])
    assert cache_key(teacher, "rows-v2", 12) != cache.key
    assert cache_key(teacher, "rows-v1", 13) != cache.key
    assert cache_key(teacher, "rows-v1", 12, spec=CacheSpec(dtype=torch.float16)) != cache.key
    other = copy.deepcopy(teacher)
    with torch.no_grad():
        other.classifier.bias.add_(1e-3)
    assert cache_key(other, "rows-v1", 12) != cache.key
    assert TeacherCache.load_or_build(other, data, collate, "rows-v1", folder=tmp_path, build=False) is None


def test_fp16_cache_is_close(tmp_path):
    teacher, _ = models()
    data = Rows(6)
    full = TeacherCache.load_or_build(teacher, data, collate, "d", folder=tmp_path)
    half = TeacherCache.load_or_build(teacher, data, collate, "d", folder=tmp_path,
                                      spec=CacheSpec(dtype=torch.float16))
    index = torch.arange(6)
    assert half.store["logits"].dtype == torch.float16
    assert torch.allclose(full.logits(index), half.logits(index), atol=2e-3)


def test_top_k_keeps_the_top_probabilities_and_the_remaining_mass():
    z = torch.tensor([[3.0, 1.0, 0.0, -1.0, -2.0]])
    dense = densify(**sparsify(z, 2), num_classes=5)
    p, q = torch.softmax(z, -1)[0], torch.softmax(dense, -1)[0]
    assert torch.allclose(q[:2], p[:2], atol=1e-6)  # top-2 probabilities exact at T = 1
    rest = 1 - p[0] - p[1]
    assert torch.allclose(q[2:], torch.full((3,), float(rest) / 3), atol=1e-6)  # rest shared equally
    # the hand value: p_0 = e^3 / (e^3 + e + 1 + e^-1 + e^-2)
    assert float(q[0]) == pytest.approx(math.exp(3) / sum(math.exp(v) for v in (3, 1, 0, -1, -2)), rel=1e-6)


def test_top_k_tail_keeps_its_mass_at_the_loss_temperature():
    torch.manual_seed(0)
    z = torch.randn(4, 50) * 3
    t = 15.0
    dense = densify(**sparsify(z, 5, temperature=t), num_classes=50)
    p, q = torch.softmax(z / t, -1), torch.softmax(dense / t, -1)
    top = z.topk(5, dim=-1).indices
    assert torch.allclose(q.gather(1, top), p.gather(1, top), atol=1e-6)  # top-5 exact at T = 15
    tail = 1 - p.gather(1, top).sum(-1, keepdim=True)
    others = q.scatter(1, top, 0.0)
    assert torch.allclose(others.sum(-1, keepdim=True), tail, atol=1e-6)
    # the T = 1 fill leaves the tail's mass wrong at T = 15 (why the cache fits it at the loss's T)
    q1 = torch.softmax(densify(**sparsify(z, 5), num_classes=50) / t, -1)
    assert not torch.allclose(q1.gather(1, top), p.gather(1, top), atol=1e-3)


def test_cache_fits_the_tail_at_the_temperature_of_the_terms_bound_to_its_teacher():
    from kdforge.recipes.teacher_sources import bound_temperature

    def loss(*objectives):
        return WeightedLoss.from_config([ObjectiveConfig(**o) for o in objectives], ["t1", "t2"])

    assert bound_temperature(loss({"name": "word_kd", "teacher": "t1"}), "t1") == 15.0  # the default counts
    assert bound_temperature(loss({"name": "ce"}, {"name": "hinton_kd", "temperature": 4.0, "teacher": "t1"}),
                             "t1") == 4.0
    assert bound_temperature(loss({"name": "ce"}), "t1") == 1.0
    assert bound_temperature(loss({"name": "hinton_kd", "temperature": 2.0, "teacher": "t1"},
                                  {"name": "dkd", "temperature": 4.0, "teacher": "t1"}), "t1") == 1.0
    # each teacher's cache knows the temperature of its own terms
    two = loss({"name": "hinton_kd", "temperature": 2.0, "teacher": "t1"},
               {"name": "hinton_kd", "temperature": 4.0, "teacher": "t2"})
    assert (bound_temperature(two, "t1"), bound_temperature(two, "t2")) == (2.0, 4.0)
    assert CacheSpec(top_k=8, temperature=15.0).tag() != CacheSpec(top_k=8).tag()  # a different cache file
    assert CacheSpec(temperature=15.0).tag() == CacheSpec().tag()  # dense logits do not depend on it


class HiddenProbe(Objective):
    """MSE between student and teacher hidden state 1 (reads teacher.hidden_states)."""

    requires = frozenset({"hidden_states"})

    def forward(self, student, teacher, batch, progress):
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return (((student.hidden_states[1] - teacher.hidden_states[1]) * mask) ** 2).mean()


def test_cached_hidden_states_are_padded_back_and_give_the_same_loss(tmp_path):
    teacher, student = models()
    data = Rows(10)
    spec = CacheSpec(hidden_states=(1,))
    cache = TeacherCache.load_or_build(teacher, data, collate, "h", batch_size=4, folder=tmp_path, spec=spec)
    batch = IndexedCollator(collate)([IndexedDataset(data)[i] for i in (0, 5, 9)])
    out = cache.lookup(batch)
    with torch.no_grad():
        reference = ModelAdapter(teacher.eval(), hidden_states=True)(batch)
    mask = batch["attention_mask"].bool()
    assert out.hidden_states[0] is None and out.hidden_states[2] is None
    assert torch.allclose(out.hidden_states[1][mask], reference.hidden_states[1][mask], atol=1e-5)
    assert torch.all(out.hidden_states[1][~mask] == 0)
    loss = WeightedLoss([HiddenProbe()], [lambda p: 1.0], ["probe"])
    plain = offline_step(ModelAdapter(student, hidden_states=True), loss, ModelAdapter(teacher, hidden_states=True))
    cached = offline_step(ModelAdapter(student, hidden_states=True), loss, cache=cache)
    assert torch.allclose(plain(batch, Progress())[0], cached(batch, Progress())[0], atol=1e-6)
