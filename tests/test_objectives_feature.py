"""Feature-level objectives (TinyBERT, PKD, FitNets hints) and CKA hint-point selection.

Expected values are derived by hand from the papers' formulas (worked in the comments) on tiny
tensors; the attention scores are checked against Hugging Face's eager attention maps.
"""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from kdforge.config import ObjectiveConfig
from kdforge.errors import KDForgeError
from kdforge.models.adapter import ModelAdapter
from kdforge.models.outputs import Outputs
from kdforge.objectives.base import Progress, build_objective
from kdforge.objectives.composite import WeightedLoss
from kdforge.objectives.hint import Regressor, hint_loss
from kdforge.objectives.hint_points import hint_points_for, layer_similarity, linear_cka, select_hint_points
from kdforge.objectives.pkd import patience_loss, pkd_layer_map
from kdforge.objectives.tinybert import (
    AttentionSpec,
    attention_scores,
    attention_specs,
    soft_cross_entropy,
    valid_entries,
)
from tests.helpers import offline_step, tiny_bert

P0 = Progress(step=0, total_steps=10)


def fake_encoder(layers, width):
    """Just what setup() reads: config.num_hidden_layers and config.hidden_size."""
    return SimpleNamespace(config=SimpleNamespace(num_hidden_layers=layers, hidden_size=width))


def objective(name, **params):
    return build_objective(ObjectiveConfig(name=name, **params))


def softmax(z):
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


@pytest.fixture(scope="module")
def pair():
    """A 4-layer width-32 teacher and a 2-layer width-16 student (2 heads each), in eval mode."""
    teacher, student = tiny_bert(100, layers=4, hidden=32, seed=0), tiny_bert(100, layers=2, hidden=16, seed=1)
    return student.eval(), teacher.eval()


@pytest.fixture()
def batch():
    torch.manual_seed(0)
    return {"input_ids": torch.randint(1, 100, (2, 6)),
            "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]),
            "labels": torch.tensor([0, 1])}


def run(configs, student, teacher, batch):
    """Build the loss as the engine does (setup -> hook paths -> adapters) and run one forward."""
    loss = WeightedLoss.from_config([ObjectiveConfig(**c) for c in configs])
    s_paths, t_paths = loss.setup(student, {"teacher": teacher})
    needs = loss.requires()
    wrap = lambda m, paths: ModelAdapter(m, paths, "hidden_states" in needs, "attentions" in needs)  # noqa: E731
    module = offline_step(wrap(student, s_paths), loss, wrap(teacher, t_paths["teacher"]))
    module.eval()
    return module, *module(batch, P0)


# ---------------------------------------------------------------------------------------------
# TinyBERT prediction layer
# ---------------------------------------------------------------------------------------------


def test_tinybert_pred_is_soft_cross_entropy_without_t_squared():
    # teacher (ln 3, 0) -> p_t = (3/4, 1/4); student (0, 0) -> p_s = (1/2, 1/2)
    # CE = -(3/4 ln 1/2 + 1/4 ln 1/2) = ln 2 at t = 1 (the default)
    s, t = torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]])
    assert objective("tinybert_pred")(Outputs(s), Outputs(t), {}, P0).item() == pytest.approx(math.log(2), rel=1e-6)
    # two samples, three classes, t = 2: batch mean of -sum_c p_t,c log p_s,c; no T^2 factor
    s = [[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]]
    t = [[2.0, 0.0, 0.0], [0.0, 0.0, 3.0]]
    per_sample = [-sum(pt * math.log(ps) for pt, ps in zip(softmax([v / 2 for v in tr]), softmax([v / 2 for v in sr]),
                                                           strict=True))
                  for sr, tr in zip(s, t, strict=True)]
    value = objective("tinybert_pred", temperature=2.0)(Outputs(torch.tensor(s)), Outputs(torch.tensor(t)), {}, P0)
    assert value.item() == pytest.approx(sum(per_sample) / 2, rel=1e-6)
    # the official code's .mean() divides by the number of classes too
    official = objective("tinybert_pred", temperature=2.0, reduction="mean")(
        Outputs(torch.tensor(s)), Outputs(torch.tensor(t)), {}, P0)
    assert official.item() == pytest.approx(sum(per_sample) / 2 / 3, rel=1e-6)


def test_tinybert_pred_gradient_and_detached_teacher():
    # d/dz_s -sum p_t log softmax(z_s / T) = (p_s - p_t) / T, divided by N for the batch mean
    T = 2.0
    s = torch.tensor([[0.5, -1.0, 2.0], [0.0, 0.3, -0.2]], requires_grad=True)
    t = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.1, 0.0]], requires_grad=True)
    soft_cross_entropy(s, t, T).backward()
    expected = (torch.softmax(s.detach() / T, -1) - torch.softmax(t.detach() / T, -1)) / T / 2
    assert torch.allclose(s.grad, expected, atol=1e-6)
    assert t.grad is None


def test_tinybert_pred_gradcheck_with_learned_per_sample_temperature():
    s = torch.randn(3, 4, dtype=torch.double, requires_grad=True)
    t = torch.randn(3, 4, dtype=torch.double)
    temp = torch.tensor([[1.5], [2.0], [0.7]], dtype=torch.double, requires_grad=True)
    term = objective("tinybert_pred")
    assert torch.autograd.gradcheck(lambda x, T: term.logit_loss(x, t, None, T, P0), (s, temp))


def test_tinybert_pred_refuses_regression_and_bad_config():
    with pytest.raises(KDForgeError, match="logit_mse"):
        objective("tinybert_pred")(Outputs(torch.zeros(2, 1)), Outputs(torch.zeros(2, 1)), {}, P0)
    with pytest.raises(KDForgeError, match="temperature"):
        objective("tinybert_pred", temperature=0)
    with pytest.raises(KDForgeError, match="reduction"):
        objective("tinybert_pred", reduction="sum")


# ---------------------------------------------------------------------------------------------
# TinyBERT hidden states
# ---------------------------------------------------------------------------------------------


def hidden_term(**params):
    term = objective("tinybert_hidden", **params)
    term.setup(fake_encoder(1, 1), fake_encoder(2, 2))  # M = 1, N = 2: k = 2, map 0 -> 0, 1 -> 2
    with torch.no_grad():
        term.proj_hidden.weight.copy_(torch.tensor([[-1.0], [0.0]]))
        term.proj_hidden.bias.copy_(torch.tensor([0.5, 0.0]))
        if term.proj_embeddings is not None:
            term.proj_embeddings.weight.copy_(torch.tensor([[1.0], [2.0]]))
            term.proj_embeddings.bias.zero_()
    return term


STUDENT_HS = (torch.tensor([[[1.0], [2.0]]]), torch.tensor([[[0.5], [-1.0]]]))
TEACHER_HS = (torch.tensor([[[1.0, 1.0], [3.0, 5.0]]]), torch.full((1, 2, 2), 9.0),
              torch.tensor([[[0.0, 0.0], [1.0, 1.0]]]))


def test_tinybert_hidden_value_with_separate_embedding_and_hidden_projections():
    term = hidden_term()
    assert term.layer_map == [(0, 0), (1, 2)]
    # embeddings: E W_e^T = (1, 2), (2, 4) vs (1, 1), (3, 5): squared errors 0 + 1 + 1 + 1 = 3, MSE 3/4
    # layer 1:    H W_h^T + b = (0, 0), (1.5, 0) vs (0, 0), (1, 1): 0 + 0 + 0.25 + 1 = 1.25, MSE 1.25/4
    value = term(Outputs(torch.zeros(1, 2), hidden_states=STUDENT_HS),
                 Outputs(torch.zeros(1, 2), hidden_states=TEACHER_HS), {}, P0)
    assert value.item() == pytest.approx(0.75 + 0.3125)


def test_tinybert_hidden_shared_projection_as_in_the_official_code():
    term = hidden_term(shared_projection=True)
    assert term.proj_embeddings is None and len(list(term.parameters())) == 2
    # embeddings through W_h: (-0.5, 0), (-1.5, 0) vs (1, 1), (3, 5): 2.25 + 1 + 20.25 + 25 = 48.5, MSE 12.125
    value = term(Outputs(torch.zeros(1, 2), hidden_states=STUDENT_HS),
                 Outputs(torch.zeros(1, 2), hidden_states=TEACHER_HS), {}, P0)
    assert value.item() == pytest.approx(12.125 + 0.3125)


def test_tinybert_hidden_gradients_reach_student_and_projections_but_not_teacher():
    term = hidden_term()
    s = tuple(h.clone().requires_grad_() for h in STUDENT_HS)
    t = tuple(h.clone().requires_grad_() for h in TEACHER_HS)
    term(Outputs(torch.zeros(1, 2), hidden_states=s), Outputs(torch.zeros(1, 2), hidden_states=t), {}, P0).backward()
    assert all(h.grad is None for h in t)
    # d/dE of mean((E W_e^T - T)^2) over 4 elements = 2/4 sum_c (E W_e^T - T)_c W_e,c
    # token 1: residual (0, 1) -> 0.5 * (0*1 + 1*2) = 1; token 2: (-1, -1) -> 0.5 * (-1 - 2) = -1.5
    assert s[0].grad.flatten().tolist() == pytest.approx([1.0, -1.5])
    assert term.proj_hidden.weight.grad is not None and term.proj_embeddings.weight.grad is not None


def test_tinybert_hidden_gradcheck():
    term = hidden_term().double()
    t = tuple(h.double() for h in TEACHER_HS)

    def f(e, h):
        return term(Outputs(torch.zeros(1, 2), hidden_states=(e, h)), Outputs(torch.zeros(1, 2), hidden_states=t),
                    {}, P0)

    inputs = tuple(torch.randn(1, 2, 1, dtype=torch.double, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(f, inputs)


def test_tinybert_hidden_layer_map_default_and_validation(pair):
    student, teacher = pair
    term = objective("tinybert_hidden")
    term.setup(student, teacher)  # M = 2, N = 4: k = 2
    assert term.layer_map == [(0, 0), (1, 2), (2, 4)]
    assert term.proj_hidden.weight.shape == (32, 16)
    explicit = objective("tinybert_hidden", layer_map=[[0, 0], [2, 3]])
    explicit.setup(student, teacher)
    assert explicit.layer_map == [(0, 0), (2, 3)]
    with pytest.raises(KDForgeError, match="out of range"):
        objective("tinybert_hidden", layer_map=[[3, 4]]).setup(student, teacher)
    with pytest.raises(KDForgeError, match="layer_map"):
        objective("tinybert_hidden", layer_map=[[0, -1]])
    with pytest.raises(KDForgeError, match="does not exist"):
        objective("tinybert_hidden", layermap=[[0, 0]])
    with pytest.raises(KDForgeError, match="at least as many layers"):
        objective("tinybert_hidden").setup(teacher, student)


# ---------------------------------------------------------------------------------------------
# TinyBERT attention
# ---------------------------------------------------------------------------------------------


def test_attention_scores_by_hand():
    # one head, d = 2: q0 = (1, 1), k0 = (1, 3) -> q0.k0 / sqrt(2) = 4 / sqrt(2)
    spec = AttentionSpec("q", "k", heads=1, scaling=None, causal=False)
    q, k = torch.tensor([[[1.0, 1.0]]]), torch.tensor([[[1.0, 3.0]]])
    assert attention_scores(q, k, spec).item() == pytest.approx(4 / math.sqrt(2))


def attention_term():
    term = objective("tinybert_attention")
    term.layer_map = [(0, 0)]
    term.student_specs = [AttentionSpec("q", "k", heads=2, scaling=None, causal=False)]
    term.teacher_specs = [AttentionSpec("tq", "tk", heads=2, scaling=None, causal=False)]
    return term


def test_tinybert_attention_value_masks_keys_and_averages_heads():
    # two heads of size 1 (scale 1). Student queries: token 0 (1, 2), token 1 (0, 1); keys: (1, 1), (2, -1)
    # head a: q = [1, 0], k = [1, 2] -> [[1, 2], [0, 0]]; head b: q = [2, 1], k = [1, -1] -> [[2, -2], [1, -1]]
    # key 1 is padding -> column 1 set to 0: head a [[1, 0], [0, 0]] (MSE 1/4), head b [[2, 0], [1, 0]] (MSE 5/4)
    # the teacher's scores are 0; (1/h) sum_heads MSE = (1/4 + 5/4) / 2 = 0.75
    features = {"q": torch.tensor([[[1.0, 2.0], [0.0, 1.0]]]), "k": torch.tensor([[[1.0, 1.0], [2.0, -1.0]]])}
    t_features = {"tq": torch.zeros(1, 2, 2), "tk": torch.zeros(1, 2, 2)}
    s, t = Outputs(torch.zeros(1, 2), features=features), Outputs(torch.zeros(1, 2), features=t_features)
    term = attention_term()
    assert term(s, t, {"attention_mask": torch.tensor([[1, 0]])}, P0).item() == pytest.approx(0.75)
    # no padding: (1 + 4 + 0 + 0 + 4 + 4 + 1 + 1) / 8
    assert term(s, t, {}, P0).item() == pytest.approx(15 / 8)


def test_tinybert_attention_teacher_is_detached_and_gradcheck():
    term = attention_term()
    tq, tk = torch.randn(1, 3, 2, requires_grad=True), torch.randn(1, 3, 2, requires_grad=True)
    q, k = torch.randn(1, 3, 2, requires_grad=True), torch.randn(1, 3, 2, requires_grad=True)
    mask = {"attention_mask": torch.tensor([[1, 1, 0]])}
    term(Outputs(torch.zeros(1, 2), features={"q": q, "k": k}),
         Outputs(torch.zeros(1, 2), features={"tq": tq, "tk": tk}), mask, P0).backward()
    assert tq.grad is None and tk.grad is None and q.grad is not None
    t = Outputs(torch.zeros(1, 2), features={"tq": tq.detach().double(), "tk": tk.detach().double()})

    def f(qq, kk):
        return term(Outputs(torch.zeros(1, 2), features={"q": qq, "k": kk}), t, mask, P0)

    assert torch.autograd.gradcheck(f, (q.detach().double().requires_grad_(), k.detach().double().requires_grad_()))


def probabilities_from_hooks(model, batch):
    """Scores from the hooked projections + mask + softmax, and HF's eager attention maps."""
    specs = attention_specs(model)
    adapter = ModelAdapter(model, [p for s in specs for p in (s.query, s.key)], attentions=True)
    assert model.config._attn_implementation == "eager"
    with torch.no_grad():
        out = adapter(batch)
    mask = batch.get("attention_mask")
    ours = []
    for spec in specs:
        scores = attention_scores(out.features[spec.query], out.features[spec.key], spec)
        n, _, length, _ = scores.shape
        valid = valid_entries(mask, n, length, spec.causal, scores.device)
        ours.append(torch.softmax(scores.masked_fill(~valid, float("-inf")), dim=-1))
    return ours, out.attentions


def test_attention_scores_softmax_equal_bert_eager_attention_maps(batch):
    model = tiny_bert(100, layers=2, hidden=16, seed=3).eval()
    ours, theirs = probabilities_from_hooks(model, batch)
    assert len(ours) == len(theirs) == 2
    for a, b in zip(ours, theirs, strict=True):
        assert a.shape == b.shape == (2, 2, 6, 6)
        assert torch.allclose(a, b, atol=1e-5)


def test_attention_scores_softmax_equal_llama_eager_attention_maps():
    # LLaMA-style q_proj/k_proj, rotary embeddings, grouped key heads and causal masking
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=64)).eval()
    batch = {"input_ids": torch.randint(1, 100, (2, 5)), "attention_mask": torch.tensor([[1] * 5, [1, 1, 1, 0, 0]])}
    ours, theirs = probabilities_from_hooks(model, batch)
    for a, b in zip(ours, theirs, strict=True):
        assert a.shape == b.shape == (2, 4, 5, 5)
        assert torch.allclose(a, b, atol=1e-5)


def test_tinybert_attention_default_map_hooks_and_head_check(pair):
    student, teacher = pair
    term = objective("tinybert_attention")
    term.setup(student, teacher)
    assert term.layer_map == [(0, 1), (1, 3)]  # i -> i * k + k - 1 with k = 2
    s_paths, t_paths = term.hook_paths(student, teacher)
    assert s_paths == ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.attention.self.key",
                       "bert.encoder.layer.1.attention.self.query", "bert.encoder.layer.1.attention.self.key"]
    assert t_paths[0] == "bert.encoder.layer.1.attention.self.query" and len(t_paths) == 4
    four_heads = tiny_bert(100, layers=2, hidden=16)
    four_heads.config.num_attention_heads = 4
    with pytest.raises(KDForgeError, match="same number of attention heads"):
        objective("tinybert_attention").setup(four_heads, teacher)


def test_tinybert_attention_value_on_bert_pair_matches_scores_from_the_models_own_modules(pair, batch):
    # independent path: recompute Q K^T / sqrt(d) from the models' query/key modules on the hidden states
    student, teacher = pair
    _, total, terms = run([{"name": "tinybert_attention"}], student, teacher, batch)
    with torch.no_grad():
        hs = student(**{k: v for k, v in batch.items() if k != "labels"}, output_hidden_states=True).hidden_states
        ht = teacher(**{k: v for k, v in batch.items() if k != "labels"}, output_hidden_states=True).hidden_states
    expected = 0.0
    keep = batch["attention_mask"][:, None, None, :].bool()
    for i, t in [(0, 1), (1, 3)]:
        per_model = []
        for model, h, layer in ((student, hs, i), (teacher, ht, t)):
            attention = model.bert.encoder.layer[layer].attention.self
            q = attention.query(h[layer]).view(2, 6, 2, -1).transpose(1, 2)
            k = attention.key(h[layer]).view(2, 6, 2, -1).transpose(1, 2)
            per_model.append((q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~keep, 0.0))
        expected += ((per_model[0] - per_model[1]) ** 2).mean().item()
    assert total.item() == pytest.approx(expected, rel=1e-5)
    assert terms["tinybert_attention"] == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# PKD
# ---------------------------------------------------------------------------------------------


def test_pkd_layer_maps_follow_the_paper():
    # 6-layer student from a 12-layer teacher: PKD-Skip {2, 4, 6, 8, 10}, PKD-Last {7, 8, 9, 10, 11}
    assert [t for _, t in pkd_layer_map(6, 12, "skip")] == [2, 4, 6, 8, 10]
    assert [t for _, t in pkd_layer_map(6, 12, "last")] == [7, 8, 9, 10, 11]
    assert [s for s, _ in pkd_layer_map(6, 12, "skip")] == [1, 2, 3, 4, 5]  # the last student layer is excluded
    # 3-layer student: Skip {4, 8}, Last {10, 11}
    assert pkd_layer_map(3, 12, "skip") == [(1, 4), (2, 8)]
    assert pkd_layer_map(3, 12, "last") == [(1, 10), (2, 11)]
    with pytest.raises(KDForgeError, match="at least 2 layers"):
        pkd_layer_map(1, 12, "skip")


def pkd_outputs():
    # sample 0: layer 1 s = (3, 4) -> (.6, .8) vs t(2) = (1, 0): |(-.4, .8)|^2 = .8
    #           layer 2 s = (1, 0) vs t(4) = (0, 2) -> (0, 1):    |(1, -1)|^2  = 2
    # sample 1: layer 1 s = (0, 5) -> (0, 1) vs (0, 1): 0;  layer 2 s = (-1, 0) vs (1, 0): |(-2, 0)|^2 = 4
    def states(cls_by_index, count):
        torch.manual_seed(len(cls_by_index))
        hs = [torch.randn(2, 3, 2) * 10 for _ in range(count)]  # positions 1, 2 are noise the loss must ignore
        for index, cls in cls_by_index.items():
            hs[index][:, 0] = torch.tensor(cls)
        return tuple(hs)

    s = states({1: [[3.0, 4.0], [0.0, 5.0]], 2: [[1.0, 0.0], [-1.0, 0.0]]}, 4)
    t = states({2: [[1.0, 0.0], [0.0, 1.0]], 4: [[0.0, 2.0], [1.0, 0.0]]}, 7)
    return Outputs(torch.zeros(2, 2), hidden_states=s), Outputs(torch.zeros(2, 2), hidden_states=t)


@pytest.mark.parametrize("reduction, expected", [
    ("sum", (0.8 + 2 + 0 + 4) / 2),       # eq. (3): sum over layers and units, batch mean
    ("mean", (0.8 + 2 + 0 + 4) / 8),      # official F.mse_loss: mean over 2 samples x 2 layers x 2 units
])
def test_pkd_patience_loss_by_hand(reduction, expected):
    term = objective("pkd", reduction=reduction)
    term.setup(fake_encoder(3, 2), fake_encoder(6, 2))  # skip: k = 2, student 1 -> 2, 2 -> 4
    assert term.layer_map == [(1, 2), (2, 4)]
    s, t = pkd_outputs()
    assert term(s, t, {}, P0).item() == pytest.approx(expected, rel=1e-6)


def test_pkd_teacher_detached_gradcheck_and_scale_invariance():
    s = [torch.randn(3, 4, dtype=torch.double, requires_grad=True) for _ in range(2)]
    t = [torch.randn(3, 4, dtype=torch.double, requires_grad=True) for _ in range(2)]
    patience_loss(s, t).backward()
    assert all(x.grad is None for x in t) and all(x.grad is not None for x in s)
    # gradient of a normalised vector is orthogonal to it: d/dh of f(h / |h|) . h = 0
    assert torch.allclose((s[0].grad * s[0].detach()).sum(-1), torch.zeros(3, dtype=torch.double), atol=1e-12)
    td = [x.detach() for x in t]
    assert torch.autograd.gradcheck(lambda a, b: patience_loss([a, b], td, "sum"),
                                    tuple(x.detach().requires_grad_() for x in s))
    assert patience_loss([x * 7 for x in s], td).item() == pytest.approx(patience_loss(s, td).item())


def test_pkd_needs_equal_widths_unless_projected(pair, batch):
    student, teacher = pair
    with pytest.raises(KDForgeError, match="projection: true") as err:
        objective("pkd").setup(student, teacher)
    assert "\n" not in str(err.value)
    module, total, terms = run([{"name": "pkd", "projection": True}], student, teacher, batch)
    assert module.loss.objectives[0].layer_map == [(1, 2)]  # M = 2: only layer 1, to teacher layer 2
    total.backward()
    assert module.loss.objectives[0].projection.weight.grad is not None
    with pytest.raises(KDForgeError, match="strategy"):
        objective("pkd", strategy="middle")


# ---------------------------------------------------------------------------------------------
# FitNets hints
# ---------------------------------------------------------------------------------------------


def test_hint_loss_on_tokens_by_hand():
    # regressor r(s) = W s + b with W = [[2], [-1]], b = (0, 1)
    # token 1: s = 3 -> r = (6, -2) vs t = (5, 0): 1/2 (1 + 4) = 2.5
    # token 2: s = 0 -> r = (0, 1)  vs t = (0, 1): 0           -> mean over tokens 1.25
    regressor = Regressor(1, 2)
    with torch.no_grad():
        regressor.weight.copy_(torch.tensor([[2.0], [-1.0]]))
        regressor.bias.copy_(torch.tensor([0.0, 1.0]))
    s = torch.tensor([[[3.0], [0.0]]])
    t = torch.tensor([[[5.0, 0.0], [0.0, 1.0]]])
    assert hint_loss(regressor(s), t).item() == pytest.approx(1.25)


def test_hint_loss_on_conv_maps_sums_channels_and_averages_batch_and_pixels():
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 2, 2), torch.randn(2, 4, 2, 2)
    regressor = Regressor(3, 4)
    w, b = regressor.weight.tolist(), regressor.bias.tolist()
    total = 0.0
    for n in range(2):
        for y in range(2):
            for x in range(2):
                for c in range(4):
                    r = b[c] + sum(w[c][j] * s[n, j, y, x].item() for j in range(3))
                    total += 0.5 * (t[n, c, y, x].item() - r) ** 2
    assert hint_loss(regressor(s), t).item() == pytest.approx(total / (2 * 2 * 2), rel=1e-5)


def test_hint_objective_with_conv_paths_infers_widths_and_detaches_teacher():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Sequential(nn.Conv2d(4, 5, 1), nn.BatchNorm2d(5)))
    teacher = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 1))
    term = objective("hint", student_path="1", teacher_path="2", activation="relu")
    term.setup(student, teacher)
    assert term.regressors[0].weight.shape == (6, 5)  # widths from BatchNorm2d(5) and Conv2d(., 6)
    assert term.hook_paths(student, teacher) == (["1"], ["2"])
    assert term.requires == frozenset()
    s_out, t_out = ModelAdapter(student, ["1"]), ModelAdapter(teacher, ["2"])
    x = {"pixel_values": torch.randn(2, 3, 4, 4)}
    s, t = s_out(x), t_out(x)
    t.features["2"] = t.features["2"].detach().requires_grad_()
    value = term(s, t, {}, P0)
    expected = 0.5 * (t.features["2"] - torch.relu(term.regressors[0](s.features["1"]))).pow(2).sum(1).mean()
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)
    value.backward()
    assert t.features["2"].grad is None and term.regressors[0].weight.grad is not None
    assert student[0].weight.grad is not None and all(p.grad is None for p in teacher.parameters())


def test_hint_gradcheck():
    regressor = Regressor(3, 2).double()
    t = torch.randn(2, 4, 2, dtype=torch.double)
    s = torch.randn(2, 4, 3, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: hint_loss(torch.nn.functional.linear(x, w, regressor.bias), t),
                                    (s, regressor.weight.detach().clone().requires_grad_()))


def test_hint_pairs_on_bert_hidden_states_and_paths_are_summed(pair, batch):
    student, teacher = pair
    configs = [{"name": "hint", "pairs": [[1, 2], ["bert.encoder.layer.1.output", "bert.encoder.layer.3.output"]]}]
    module, total, _ = run(configs, student, teacher, batch)
    term = module.loss.objectives[0]
    assert term.requires == frozenset({"hidden_states"})
    assert [r.weight.shape for r in term.regressors] == [(32, 16), (32, 16)]  # config width; LayerNorm width
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        hs, ht = (m(**inputs, output_hidden_states=True).hidden_states for m in (student, teacher))
        # BertOutput of layer i is hidden state i + 1
        expected = sum(0.5 * (ht[t] - r(hs[s])).pow(2).sum(-1).mean()
                       for (s, t), r in zip([(1, 2), (2, 4)], term.regressors, strict=True))
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)


def test_hint_config_errors():
    with pytest.raises(KDForgeError, match="exactly one of student_path and student_layer"):
        objective("hint", student_path="a", student_layer=1, teacher_layer=2)
    with pytest.raises(KDForgeError, match="exactly one of teacher_path"):
        objective("hint", student_layer=1)
    with pytest.raises(KDForgeError, match="either `pairs`"):
        objective("hint", pairs=[[1, 2]], student_layer=1)
    with pytest.raises(KDForgeError, match="widths"):
        objective("hint", pairs=[[1, 2]], widths=[[1, 2], [3, 4]])
    with pytest.raises(KDForgeError, match="out of range"):
        objective("hint", student_layer=9, teacher_layer=1).setup(fake_encoder(2, 4), fake_encoder(4, 8))
    with pytest.raises(KDForgeError, match="differ in shape"):
        hint_loss(torch.zeros(1, 2, 3), torch.zeros(1, 3, 3))


# ---------------------------------------------------------------------------------------------
# Everything together through the engine's module
# ---------------------------------------------------------------------------------------------


def test_all_feature_terms_train_together_with_sdpa_attention(batch):
    student, teacher = tiny_bert(100, layers=2, hidden=16, seed=5), tiny_bert(100, layers=4, hidden=32, seed=6)
    assert student.config._attn_implementation != "eager"  # the attention term needs no attention maps
    configs = [{"name": "tinybert_hidden"}, {"name": "tinybert_attention"}, {"name": "tinybert_pred"},
               {"name": "pkd", "projection": True, "weight": 100}, {"name": "hint", "student_layer": 1,
                                                                     "teacher_layer": 2}]
    module, total, terms = run(configs, student, teacher, batch)
    assert set(terms) == {"tinybert_hidden", "tinybert_attention", "tinybert_pred", "pkd", "hint"}
    assert all(math.isfinite(v) and v > 0 for v in terms.values())
    assert module.loss.requires() == frozenset({"hidden_states"})
    total.backward()
    assert student.bert.encoder.layer[0].attention.self.query.weight.grad is not None
    assert all(p.grad is not None for p in module.loss.parameters())
    assert all(p.grad is None for p in teacher.parameters())


# ---------------------------------------------------------------------------------------------
# CKA and hint-point selection
# ---------------------------------------------------------------------------------------------


def plain_cka(x, y):
    """||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) on centred columns, in plain Python lists."""
    def centre(m):
        means = [sum(col) / len(m) for col in zip(*m, strict=True)]
        return [[v - mu for v, mu in zip(row, means, strict=True)] for row in m]

    def cross_sq(a, b):  # ||A^T B||_F^2
        return sum(sum(ra[i] * rb[j] for ra, rb in zip(a, b, strict=True)) ** 2
                   for i in range(len(a[0])) for j in range(len(b[0])))

    x, y = centre(x), centre(y)
    return cross_sq(y, x) / math.sqrt(cross_sq(x, x) * cross_sq(y, y))


def test_linear_cka_by_hand():
    # 1-d features: linear CKA is the squared Pearson correlation.
    # x = 1, 2, 3, 4 (centred -1.5, -.5, .5, 1.5); y = 1, 3, 2, 5 (centred -1.75, .25, -.75, 2.25)
    # sum dx dy = 5.5, sum dx^2 = 5, sum dy^2 = 8.75 -> 5.5^2 / (5 * 8.75)
    x, y = torch.tensor([[1.0], [2.0], [3.0], [4.0]]), torch.tensor([[1.0], [3.0], [2.0], [5.0]])
    assert linear_cka(x, y) == pytest.approx(5.5**2 / (5 * 8.75))
    a = [[1.0, 0.0, 2.0], [0.5, 1.0, -1.0], [2.0, 2.0, 0.0], [-1.0, 0.5, 1.0], [0.0, -2.0, 3.0]]
    b = [[1.0, 2.0], [0.0, 1.0], [3.0, -1.0], [1.0, 1.0], [2.0, 0.5]]
    assert linear_cka(torch.tensor(a), torch.tensor(b)) == pytest.approx(plain_cka(a, b), rel=1e-9)


def test_cka_identity_invariances_and_independence():
    torch.manual_seed(0)
    x = torch.randn(50, 8, dtype=torch.double)
    assert linear_cka(x, x) == pytest.approx(1.0)
    q, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.double))
    y = torch.randn(50, 6, dtype=torch.double) + x[:, :6]
    base = linear_cka(x, y)
    assert linear_cka(x @ q, y) == pytest.approx(base, rel=1e-9)  # orthogonal transform
    assert linear_cka(3.5 * x + 2.0, y) == pytest.approx(base, rel=1e-9)  # isotropic scaling (and a shift)
    assert linear_cka(torch.randn(2000, 4), torch.randn(2000, 4)) < 0.05  # independent features
    assert base > 0.3


def test_layer_similarity_pools_over_unmasked_tokens_only():
    torch.manual_seed(0)
    h = [torch.randn(6, 4, 3) for _ in range(3)]
    mask = torch.ones(6, 4)
    mask[:, 3] = 0
    sim = layer_similarity(h, mask)
    assert sim.shape == (3, 3) and np.allclose(np.diag(sim), 1) and np.allclose(sim, sim.T)
    changed = [x.clone() for x in h]
    for x in changed:
        x[:, 3] = 100.0 * torch.randn(6, 3)
    assert np.allclose(layer_similarity(changed, mask), sim)
    assert not np.allclose(layer_similarity(changed), sim)
    assert layer_similarity(h, pooling="cls")[0, 1] == pytest.approx(linear_cka(h[0][:, 0], h[1][:, 0]))


def block_similarity():
    # blocks {0, 1, 2}, {3, 4}, {5, 6, 7, 8}; 0.1 across blocks
    s = np.full((9, 9), 0.1)
    within = {(0, 1): 0.9, (1, 2): 0.9, (0, 2): 0.7,  # layer 1 is the most central of block 1
              (3, 4): 0.8,                          # a tie: the lower index, 3
              (5, 6): 0.9, (6, 7): 0.9, (6, 8): 0.85, (5, 7): 0.7, (5, 8): 0.6, (7, 8): 0.75}  # medoid 6
    for (i, j), v in within.items():
        s[i, j] = s[j, i] = v
    np.fill_diagonal(s, 1.0)
    return s


def test_select_hint_points_returns_each_blocks_medoid_sorted():
    # medoid costs (sum of 1 - similarity to the block): block 1: 0 -> .1 + .3 = .4, 1 -> .2, 2 -> .4
    # block 3: 5 -> .1 + .3 + .4 = .8, 6 -> .1 + .1 + .15 = .35, 7 -> .3 + .1 + .25 = .65, 8 -> .4 + .15 + .25 = .8
    s = block_similarity()
    assert select_hint_points(s, 3) == [1, 3, 6]
    assert select_hint_points(s, 3) == select_hint_points(s.copy(), 3)  # deterministic
    assert select_hint_points(s, 9) == list(range(9))
    assert len(select_hint_points(s, 1)) == 1
    with pytest.raises(KDForgeError, match="between 1 and 9"):
        select_hint_points(s, 10)
    with pytest.raises(KDForgeError, match="square"):
        select_hint_points(np.ones((2, 3)), 1)


def test_hint_points_for_a_tiny_bert(batch):
    model = tiny_bert(100, layers=4, hidden=16, seed=2)
    model.train()
    batches = [batch, {k: v.flip(0) for k, v in batch.items()}]
    points = hint_points_for(model, batches, k=2)
    assert points == sorted(points) and len(set(points)) == 2 and all(1 <= p <= 4 for p in points)
    assert hint_points_for(model, batches, k=2) == points  # eval mode: no dropout, deterministic
    assert model.training  # mode restored
    assert hint_points_for(model, batches, k=5, include_embeddings=True) == [0, 1, 2, 3, 4]
