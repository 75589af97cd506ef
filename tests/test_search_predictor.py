"""KD-NAS's controller: a reward predictor fitted on the measured rewards, picking the predicted best."""

import itertools

import numpy as np
import optuna
import pytest
from scipy.stats import spearmanr

from kdforge.config import validate_config
from kdforge.errors import KDForgeError
from kdforge.search.controller import KDNASSampler
from kdforge.search.predictor import PREDICTED, PredictorSampler, fit_predictor, prediction_track
from kdforge.search.space import SearchSpace
from kdforge.search.study import make_sampler

pytestmark = pytest.mark.usefixtures("one_thread")

CHOICES = {"a": [0, 1, 2, 3], "b": [0, 1, 2, 3], "c": [0, 1, 2, 3], "d": [0, 1, 2, 3]}


def reward(params: dict) -> float:
    """A toy reward with one best candidate (3, 0, 3, 1) and an interaction between a and b."""
    return 1.0 + 0.3 * params["a"] - 0.2 * params["b"] + 0.25 * params["c"] - 0.4 * abs(params["d"] - 1) \
        + 0.1 * params["a"] * (params["b"] == 0)


def test_the_predictor_ranks_unseen_candidates_like_their_rewards():
    grid = list(itertools.product(range(4), repeat=4))
    rng = np.random.default_rng(0)
    seen = [grid[i] for i in rng.choice(len(grid), 40, replace=False)]
    truth = lambda c: reward(dict(zip("abcd", c, strict=True)))  # noqa: E731
    model, mean, std = fit_predictor([4, 4, 4, 4], seen, [truth(c) for c in seen], seed=0)
    unseen = [c for c in grid if c not in seen]
    import torch

    with torch.no_grad():
        predicted = (model(torch.tensor(unseen)) * std + mean).numpy()
    assert spearmanr(predicted, [truth(c) for c in unseen]).statistic > 0.8  # generalises beyond the 40 fitted


def run_study(sampler, trials: int) -> optuna.Study:
    study = optuna.create_study(direction="maximize", sampler=sampler)
    study.optimize(lambda t: reward({k: t.suggest_categorical(k, v) for k, v in CHOICES.items()}), n_trials=trials)
    return study


def test_the_sampler_warms_up_at_random_then_sends_the_predicted_best_and_records_it():
    study = run_study(PredictorSampler(CHOICES, seed=0, warmup=5, pool=64, explore=0.0), 25)
    trials = study.trials
    assert all(PREDICTED not in t.system_attrs for t in trials[:5])  # warm-up: uniform random
    assert all(PREDICTED in t.system_attrs for t in trials[5:])
    assert len({tuple(t.params.values()) for t in trials[5:]}) == 20  # the pool holds unseen candidates only
    chosen = np.mean([t.value for t in trials[5:]])
    random = run_study(optuna.samplers.RandomSampler(seed=0), 25)
    assert chosen > np.mean([t.value for t in random.trials[5:]]) + 0.2  # the predictor steers to good rewards
    assert max(t.value for t in trials) >= max(t.value for t in random.trials)
    again = run_study(PredictorSampler(CHOICES, seed=0, warmup=5, pool=64, explore=0.0), 25)
    assert [t.params for t in again.trials] == [t.params for t in trials]  # deterministic for a seed


def test_prediction_track_gives_the_rank_correlation_after_each_episode():
    records = [{"number": 0, "state": "COMPLETE", "reward": 5.0},  # warm-up: no prediction
               {"number": 1, "state": "COMPLETE", "reward": 10.0, "predicted": 1.0},
               {"number": 2, "state": "COMPLETE", "reward": 30.0, "predicted": 2.0},
               {"number": 3, "state": "PRUNED", "reward": 1.0, "predicted": 9.0},
               {"number": 4, "state": "COMPLETE", "reward": 20.0, "predicted": 3.0},
               {"number": 5, "state": "COMPLETE", "reward": 40.0, "predicted": 4.0}]
    track = prediction_track(records)
    assert [t["trial"] for t in track] == [1, 2, 4, 5]
    # ranks predicted (1, 2, 3) vs measured (1, 3, 2): rho = 1 - 6 * 2 / (3 * 8) = 0.5; then (1,2,3,4) vs (1,3,2,4): 0.8
    assert [t["spearman"] for t in track] == [None, None, pytest.approx(0.5), pytest.approx(0.8)]


def test_kdnas_uses_the_predictor_by_default_and_reinforce_on_request():
    tree = {"task": {"name": "glue/sst2"}, "teacher": {"model": "x"}, "search": {"method": "kdnas"}}
    space = SearchSpace.from_dict({"layers": [1, 2], "temperature": [], "kd_weight": []}, "transformer")
    assert isinstance(make_sampler(validate_config(tree), space), PredictorSampler)
    tree["search"]["controller"] = "reinforce"
    assert isinstance(make_sampler(validate_config(tree), space), KDNASSampler)
    with pytest.raises(KDForgeError, match="warmup >= 2"):
        PredictorSampler(CHOICES, warmup=1)


def test_kdnas_searches_the_architecture_only_unless_the_space_lists_t_and_the_kd_weight():
    from kdforge.search.run import search_space_settings

    base = {"task": {"name": "glue/sst2"}, "teacher": {"model": "x"}}
    kdnas = validate_config({**base, "search": {"method": "kdnas", "space": {"layers": [1, 2]}}})
    assert search_space_settings(kdnas) == {"layers": [1, 2], "temperature": [], "kd_weight": []}
    listed = validate_config({**base, "search": {"method": "kdnas", "space": {"temperature": [2, 4]}}})
    assert search_space_settings(listed)["temperature"] == [2, 4]
    autokd = validate_config({**base, "search": {"method": "autokd", "proxy_epochs": 4}})
    assert "temperature" not in search_space_settings(autokd)  # autokd: the defaults, T and weight searched


def test_a_search_budget_too_small_to_mean_anything_is_warned():
    from kdforge.search.run import budget_warning

    assert budget_warning(60, 250, 400) is None
    line = budget_warning(1, 1, 4)
    assert line.startswith("this search has only 1 trials, 1 proxy training rows, 4 validation rows")
    assert "search.trials" in line and budget_warning(12, 50, 400) is not None
