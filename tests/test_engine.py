"""The training engine on tiny models: learning, teacher mode, cache exactness, resume, batching."""

import copy

import pytest
import torch

from kdforge.config import ObjectiveConfig, TrainConfig
from kdforge.engine.batching import batches_per_epoch, epoch_batches
from kdforge.engine.trainer import Trainer, make_optimizer
from kdforge.models.adapter import ModelAdapter
from kdforge.models.vision_nets import build_vision_net
from kdforge.objectives.base import Progress
from kdforge.objectives.composite import WeightedLoss
from tests.helpers import offline_step, tiny_bert


def test_epoch_batches_partition_and_shard():
    one = epoch_batches(10, 3, seed=0, epoch=0)
    assert sorted(i for b in one for i in b) == list(range(10))
    assert [len(b) for b in one] == [3, 3, 3, 1]
    assert one == epoch_batches(10, 3, seed=0, epoch=0)
    assert one != epoch_batches(10, 3, seed=0, epoch=1)
    ranks = [epoch_batches(10, 3, seed=0, epoch=0, rank=r, world=2) for r in (0, 1)]
    seen = [i for r in ranks for b in r for i in b]
    assert len(seen) == 10 and set(seen) == set(range(10))
    assert batches_per_epoch(10, 3, world=2) == len(ranks[0]) == 2


def kd_loss():
    return WeightedLoss.from_config([ObjectiveConfig(name="ce", weight=0.5),
                                     ObjectiveConfig(name="hinton_kd", weight=0.5, temperature=2.0)])


def test_frozen_teacher_stays_in_eval_mode_and_gets_no_gradient():
    teacher, student = tiny_bert(100, layers=2, seed=0), tiny_bert(100, layers=1, seed=1)
    module = offline_step(ModelAdapter(student), kd_loss(), ModelAdapter(teacher)).train()
    assert student.training and not teacher.training
    batch = {"input_ids": torch.randint(5, 100, (4, 7)), "labels": torch.tensor([0, 1, 0, 1])}
    first, second = (module.teacher_outputs(batch)["teacher"].logits for _ in range(2))
    assert torch.equal(first, second)  # dropout off
    loss, terms = module(batch, Progress())
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert student.classifier.weight.grad is not None
    assert student.bert.encoder.layer[0].attention.self.query.weight.grad is not None
    assert set(terms) == {"ce", "hinton_kd"}


class Rows(torch.utils.data.Dataset):
    def __init__(self, n):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(5, 100, (n, 6), generator=g)
        self.y = (self.x[:, 0] > 50).long()

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "label": int(self.y[i])}


def collate(examples):
    return {"input_ids": torch.stack([e["input_ids"] for e in examples]),
            "labels": torch.tensor([e["label"] for e in examples])}


def train_tiny(tmp_path, callbacks=(), resume=False, epochs=3):
    torch.manual_seed(0)
    student = tiny_bert(100, layers=1, seed=1)
    module = offline_step(ModelAdapter(student), WeightedLoss.from_config([ObjectiveConfig(name="ce")]))
    config = TrainConfig(epochs=epochs, batch_size=8, lr=5e-3, seed=3, device="cpu", checkpoint_every=2,
                         select_best=False)
    trainer = Trainer(module, Rows(64), collate, config, tmp_path, callbacks=callbacks)
    state = trainer.fit(resume=resume)
    return student, state


def test_training_learns_a_simple_rule(tmp_path):
    student, state = train_tiny(tmp_path / "a", epochs=6)
    data = Rows(64)
    with torch.no_grad():
        pred = student.eval()(input_ids=data.x).logits.argmax(-1)
    assert state.history[-1]["loss"] < state.history[0]["loss"]
    assert (pred == data.y).float().mean() > 0.8


class Interrupt(Exception):
    pass


def test_resume_mid_epoch_matches_an_uninterrupted_run(tmp_path):
    reference, ref_state = train_tiny(tmp_path / "ref")

    def stop_at_step_5(trainer):
        if trainer.state.step == 5:  # mid-epoch 1 (8 steps per epoch); last checkpoint at step 4
            raise Interrupt

    with pytest.raises(Interrupt):
        train_tiny(tmp_path / "run", callbacks=[stop_at_step_5])
    assert (tmp_path / "run/checkpoints/train/last/state.pt").is_file()
    resumed, state = train_tiny(tmp_path / "run", resume=True)
    assert state.step == ref_state.step
    assert [h["loss"] for h in state.history] == pytest.approx([h["loss"] for h in ref_state.history], abs=1e-6)
    for (name, a), (_, b) in zip(reference.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name
    # kept: the job (not the trainer) deletes them once its outputs are written
    assert (tmp_path / "run/checkpoints/train/last/meta.json").is_file()


def test_progress_is_where_training_stands_when_a_batch_starts(tmp_path):
    """Epoch-based rules (CA-MKD's first epoch, DKD's warm-up) see every batch of epoch e as epoch e:
    the last batch of the first epoch is still epoch 1, not 2."""
    from kdforge.engine.step import TrainStep

    class Recording(TrainStep):
        def __init__(self):
            super().__init__()
            self.learner = ModelAdapter(torch.nn.Linear(6, 2))
            self.seen = []

        def forward(self, batch, progress):
            self.seen.append((progress.epoch, progress.epoch_number, progress.step))
            return torch.nn.functional.cross_entropy(self.learner({"inputs": batch["input_ids"].float()}).logits,
                                                     batch["labels"]), {}

    step = Recording()
    config = TrainConfig(epochs=2, batch_size=16, lr=1e-3, seed=0, device="cpu", select_best=False)
    Trainer(step, Rows(64), collate, config, tmp_path).fit()
    assert [s[0] for s in step.seen] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
    assert [s[1] for s in step.seen] == [1, 1, 1, 1, 2, 2, 2, 2]
    assert [s[2] for s in step.seen] == list(range(8))


def test_sgd_steps_are_momentum_sgd_with_l2_weight_decay():
    """train.optimizer = sgd: d_t = g_t + wd * w_t, buf_t = momentum * buf_{t-1} + d_t, w_{t+1} = w_t - lr * buf_t."""
    w0, g = torch.tensor([[1.0, -2.0]]), torch.tensor([[0.2, 0.4]])
    w = torch.nn.Parameter(w0.clone())
    opt = make_optimizer([{"params": [w], "weight_decay": 0.5}], TrainConfig(optimizer="sgd", lr=0.1, momentum=0.9))
    w.grad = g.clone()
    opt.step()
    d1 = g + 0.5 * w0  # [0.7, -0.6]
    w1 = w0 - 0.1 * d1
    assert torch.allclose(w.detach(), w1)
    w.grad = g.clone()
    opt.step()
    assert torch.allclose(w.detach(), w1 - 0.1 * (0.9 * d1 + g + 0.5 * w1))
    assert isinstance(make_optimizer([{"params": [w]}], TrainConfig()), torch.optim.AdamW)  # the default


class Images(torch.utils.data.Dataset):
    def __init__(self, n):
        g = torch.Generator().manual_seed(0)
        self.y = torch.randint(0, 2, (n,), generator=g)
        self.x = torch.randn(n, 3, 8, 8, generator=g) + self.y[:, None, None, None] * 1.5

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "label": int(self.y[i])}


def test_convolutions_train_channels_last_and_are_returned_in_the_usual_layout(tmp_path):
    torch.manual_seed(0)
    net = build_vision_net("resnet8", num_classes=2)
    module = offline_step(ModelAdapter(net), WeightedLoss.from_config([ObjectiveConfig(name="ce")]))
    config = TrainConfig(epochs=4, batch_size=16, lr=0.05, optimizer="sgd", device="cpu", select_best=False,
                         trackers=[])
    layouts = []

    def record(trainer):
        layouts.append(net.stem[0].weight.is_contiguous(memory_format=torch.channels_last))

    def collate_images(examples):
        return {"pixel_values": torch.stack([e["pixel_values"] for e in examples]),
                "labels": torch.tensor([e["label"] for e in examples])}

    state = Trainer(module, Images(64), collate_images, config, tmp_path, callbacks=[record]).fit()
    assert layouts and all(layouts)  # trained channels_last
    assert all(p.is_contiguous() for p in net.parameters())  # saved / exported as usual
    assert state.history[-1]["loss"] < state.history[0]["loss"]


@pytest.mark.parametrize("shape, expected", [
    ("linear", [1 / 3, 2 / 3, 1.0, 2 / 3, 1 / 3, 0.0]),
    ("cosine", [1 / 3, 2 / 3, 1.0, 0.75, 0.25, 0.0]),  # 0.5 (1 - cos(pi * left)), left = 1, 2/3, 1/3, 0
    ("constant", [1 / 3, 2 / 3, 1.0, 1.0, 1.0, 1.0]),
])
def test_the_lr_schedules_by_hand(shape, expected):
    from kdforge.engine.trainer import linear_warmup_decay

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = linear_warmup_decay(opt, warmup=2, total=5, shape=shape)
    factors = []
    for _ in range(6):
        factors.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    assert factors == pytest.approx(expected)


def test_a_constant_lr_run_is_the_plain_pytorch_loop_on_the_same_batches(tmp_path):
    """kdforge adds nothing to the optimisation: with a constant lr, no warm-up, no clipping and no weight
    decay, its weights after 2 epochs are those of a plain loop over the same batches in the same order."""
    data = Rows(40)
    torch.manual_seed(0)
    student = tiny_bert(100, layers=1, seed=1)
    for m in student.modules():  # no dropout: the two loops draw no random masks
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if hasattr(m, "dropout_prob"):
            m.dropout_prob = 0.0
    plain = copy.deepcopy(student)
    module = offline_step(ModelAdapter(student), WeightedLoss.from_config([ObjectiveConfig(name="ce")]))
    config = TrainConfig(epochs=2, batch_size=8, lr=1e-2, optimizer="sgd", momentum=0.9, warmup_ratio=0.0,
                         scheduler="constant", max_grad_norm=None, weight_decay=0.0, shuffle=False, device="cpu",
                         select_best=False, trackers=[])
    Trainer(module, data, collate, config, tmp_path).fit()

    plain.train()
    opt = torch.optim.SGD(plain.parameters(), lr=1e-2, momentum=0.9)
    for _ in range(2):
        for start in range(0, 40, 8):
            batch = collate([data[i] for i in range(start, start + 8)])
            loss = torch.nn.functional.cross_entropy(plain(input_ids=batch["input_ids"]).logits, batch["labels"])
            opt.zero_grad()
            loss.backward()
            opt.step()
    for (name, a), b in zip(student.state_dict().items(), plain.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-5), name
