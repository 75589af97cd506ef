"""KD-NAS search: MnasNet reward, LSTM controller, REINFORCE trainer and the Optuna sampler."""

from __future__ import annotations

import math
import shutil

import optuna
import pytest
import torch

from kdforge.errors import KDForgeError
from kdforge.search.controller import ControllerTrainer, KDNASSampler, LSTMController
from kdforge.search.reward import hard_reward, mnas_reward

pytestmark = pytest.mark.usefixtures("one_thread")
optuna.logging.set_verbosity(optuna.logging.WARNING)

CHOICES = {"layers": [2, 4, 6], "width": [64.0, 128.0], "act": ["gelu", "relu", "silu", "tanh"]}


# ---------------------------------------------------------------- reward


def test_mnas_reward_by_hand():
    assert mnas_reward(0.9, 2.0, 1.0) == pytest.approx(0.9 * 2**-0.07)
    assert 0.94 < mnas_reward(1.0, 2.0, 1.0) < 0.96  # MnasNet: 2x slower costs about 5 %
    assert mnas_reward(0.9, 20.0, 10.0) == pytest.approx(mnas_reward(0.9, 2.0, 1.0))  # only the ratio counts
    assert mnas_reward(0.9, 0.5, 1.0) == pytest.approx(0.9 * 0.5**-0.07)
    assert mnas_reward(0.9, 0.5, 1.0) > 0.9  # faster than the target: a bonus
    assert mnas_reward(0.9, 3.0, 3.0) == pytest.approx(0.9)
    assert mnas_reward(0.9, 5.0, 1.0, w=0.0) == pytest.approx(0.9)
    assert mnas_reward(0.8, 4.0, 1.0, w=-0.5) == pytest.approx(0.4)


def test_hard_reward_by_hand():
    assert hard_reward(0.9, 0.5, 1.0) == pytest.approx(0.9)
    assert hard_reward(0.9, 1.0, 1.0) == pytest.approx(0.9)
    assert hard_reward(0.9, 2.0, 1.0) == pytest.approx(0.45)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((0.9, 0.0, 1.0, -0.07), "latency"),
        ((0.9, -1.0, 1.0, -0.07), "latency"),
        ((0.9, math.nan, 1.0, -0.07), "latency"),
        ((0.9, 1.0, 0.0, -0.07), "search.target_speedup"),
        ((0.9, 1.0, -2.0, -0.07), "search.target_speedup"),
        ((0.9, 1.0, 1.0, 0.1), "search.reward_weight"),
        ((0.9, 1.0, 1.0, math.inf), "search.reward_weight"),
        ((-0.1, 1.0, 1.0, -0.07), "score"),
    ],
)
def test_reward_bad_input(args, match):
    with pytest.raises(KDForgeError, match=match):
        mnas_reward(*args)
    if args[3] == -0.07:
        with pytest.raises(KDForgeError, match=match):
            hard_reward(*args[:3])


# ---------------------------------------------------------------- controller


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_controller_sample_matches_log_prob_and_probabilities():
    controller = LSTMController(CHOICES, hidden=16, seed=3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        indices, log_prob, entropy = controller.sample(generator)
        assert set(indices) == set(CHOICES) and all(0 <= indices[n] < len(CHOICES[n]) for n in CHOICES)
        again, entropy_again = controller.log_prob(indices)
        assert torch.allclose(log_prob, again) and torch.allclose(entropy, entropy_again)
        with torch.no_grad():
            probs = controller.probabilities(indices)
        for name, p in probs.items():
            assert p.shape == (len(CHOICES[name]),)
            assert float(p.sum()) == pytest.approx(1.0, abs=1e-6) and bool((p > 0).all())
        by_hand = sum(math.log(float(probs[n][indices[n]])) for n in CHOICES)
        assert float(log_prob.detach()) == pytest.approx(by_hand, abs=1e-5)
        h = sum(-float((p * p.log()).sum()) for p in probs.values())
        assert float(entropy.detach()) == pytest.approx(h, abs=1e-5)


def test_controller_is_autoregressive_and_seeded():
    controller = LSTMController(CHOICES, seed=0)
    a = controller.probabilities({"layers": 0, "width": 0, "act": 0})
    b = controller.probabilities({"layers": 2, "width": 1, "act": 0})
    assert torch.allclose(a["layers"], b["layers"])  # the first decision sees no earlier choice
    assert not torch.allclose(a["width"], b["width"])  # later ones are conditioned on earlier choices
    state = torch.get_rng_state()
    assert _same(controller, LSTMController(CHOICES, seed=0))
    assert not _same(controller, LSTMController(CHOICES, seed=1))
    assert torch.equal(state, torch.get_rng_state())  # seeding leaves the global RNG alone
    with pytest.raises(KDForgeError, match="act"):
        controller.log_prob({"layers": 0, "width": 0})
    with pytest.raises(KDForgeError, match="width"):
        controller.log_prob({"layers": 0, "width": 2, "act": 0})


@pytest.mark.parametrize("bad", [{}, {"layers": []}, {"layers": [2, 2]}, {"layers": "abc"}, {"act": [[1]]}])
def test_bad_choices(bad):
    with pytest.raises(KDForgeError):
        LSTMController(bad)
    with pytest.raises(KDForgeError):
        KDNASSampler(bad)


@pytest.mark.parametrize("reward", [1.0, -1.0])
def test_reinforce_update_moves_probability_with_advantage(reward):
    controller = LSTMController(CHOICES, seed=0)
    trainer = ControllerTrainer(controller, lr=0.01, entropy_weight=1e-3)
    trainer.baseline = 0.0
    indices = {"layers": 1, "width": 0, "act": 3}
    with torch.no_grad():
        before = float(controller.log_prob(indices)[0])
    assert trainer.update(indices, reward) == pytest.approx(reward)
    with torch.no_grad():
        after = float(controller.log_prob(indices)[0])
    assert (after - before) * reward > 1e-3
    assert trainer.baseline == pytest.approx(0.1 * reward)


def test_baseline_starts_at_first_reward_then_moving_average():
    trainer = ControllerTrainer(LSTMController(CHOICES), baseline_decay=0.9)
    indices = {"layers": 0, "width": 0, "act": 0}
    assert trainer.baseline is None
    assert trainer.update(indices, 1.0) == 0.0 and trainer.baseline == 1.0
    assert trainer.update(indices, 0.0) == pytest.approx(-1.0) and trainer.baseline == pytest.approx(0.9)
    assert trainer.update(indices, 2.0) == pytest.approx(1.1) and trainer.baseline == pytest.approx(1.01)
    with pytest.raises(KDForgeError):
        trainer.update(indices, math.nan)


# ---------------------------------------------------------------- sampler


def _objective(trial: optuna.Trial) -> float:
    params = {name: trial.suggest_categorical(name, options) for name, options in CHOICES.items()}
    trial.suggest_float("lr", 1e-5, 1e-3, log=True)  # not searched by the controller: random fallback
    return 1.0 if params["act"] == "silu" else 0.0


def _study(seed: int = 0, storage=None, name=None) -> optuna.Study:
    return optuna.create_study(
        direction="maximize", sampler=KDNASSampler(CHOICES, seed=seed), storage=storage, study_name=name
    )


def test_sampler_learns_toy_problem():
    study = _study(seed=0)
    study.optimize(_objective, n_trials=60)
    acts = [t.params["act"] for t in study.trials]
    first, last = acts[:20].count("silu"), acts[-20:].count("silu")
    assert last >= 15 and last >= first + 6, (first, last)


def test_sampler_is_deterministic_per_seed():
    runs = []
    for seed in (5, 5, 6):
        study = _study(seed=seed)
        study.optimize(_objective, n_trials=12)
        runs.append([t.params for t in study.trials])
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]
    assert len({p["lr"] for p in runs[0]}) == 12  # the fallback draws a fresh value per trial


def _next_params(study: optuna.Study) -> dict:
    trial = study.ask()
    _objective(trial)
    return trial.params


def test_new_sampler_replays_storage(tmp_path):
    first = tmp_path / "a.db"
    original = _study(seed=2, storage=f"sqlite:///{first}", name="kdnas")
    original.optimize(_objective, n_trials=10)
    assert {t.params["act"] for t in original.trials} != {"silu"}  # the replay has both rewards to learn from
    second = tmp_path / "b.db"
    shutil.copy(first, second)
    sampler = KDNASSampler(CHOICES, seed=2)  # a new object, as in a new worker or after a restart
    resumed = optuna.load_study(study_name="kdnas", storage=f"sqlite:///{second}", sampler=sampler)
    assert _next_params(resumed) == _next_params(original)


def test_cache_matches_full_replay_when_trials_finish_out_of_order():
    study = _study(seed=1)
    study.optimize(_objective, n_trials=5)
    early, late = study.ask(), study.ask()
    for trial in (early, late):
        _objective(trial)
    study.tell(late, 1.0)  # trial 6 finishes before trial 5
    _next_params(study)  # trial 7: the cache now holds trials 0-4 and 6
    study.tell(early, 0.0)  # history is now 0-6: no longer an extension of the cached one
    check = study.ask()
    _objective(check)
    frozen = study.trials[check.number]
    fresh = KDNASSampler(CHOICES, seed=1)
    proposed = fresh.sample_relative(study, frozen, fresh.infer_relative_search_space(study, frozen))
    assert proposed == {name: check.params[name] for name in CHOICES}
    assert _same(study.sampler.policy(study), fresh.policy(study))
    assert not _same(fresh.policy(study), LSTMController(CHOICES, seed=1))  # the replay did train it


def test_sampler_requires_maximize():
    study = optuna.create_study(direction="minimize", sampler=KDNASSampler(CHOICES))
    with pytest.raises(KDForgeError, match="maximize"):
        study.optimize(_objective, n_trials=1)
