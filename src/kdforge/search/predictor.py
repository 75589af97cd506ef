"""KD-NAS's controller: an LSTM that predicts a candidate's reward, and picks the predicted best.

Trivedi et al., "Neural Architecture Search for Effective Teacher-Student Knowledge Transfer in
Language Models" (arXiv 2303.09639): the controller does not sample from a policy; it *predicts the
reward* of a candidate from its choices, is trained by regression on the rewards measured so far,
scores a pool of candidates each episode and sends the predicted best, with some exploration, to the
proxy (mini-distillation). Here:

* :class:`RewardPredictor`: an LSTM over the candidate's decisions (step t reads the embedding of
  choice a_t of decision t), a linear head on the last hidden state: r_hat(a).
* :func:`fit_predictor`: trained from a seeded initialisation on every measured (candidate, reward)
  of the study, ``epochs`` full-batch Adam steps on the mean squared error of the standardised rewards
  (z = (r - mean) / std), so the fit is deterministic for a study's history.
* :class:`PredictorSampler` (an Optuna sampler): the first ``warmup`` episodes are uniform random
  candidates; from then on, each episode draws a pool of ``pool`` distinct unseen candidates (uniform,
  seeded by the trial number), predicts their rewards and sends the best, except with probability
  ``explore`` a random member of the pool. The prediction of the chosen candidate is stored on the
  trial (system attribute ``kdnas:predicted``), so the search report can show how the predictions track
  the measured rewards (:func:`prediction_track`).

Stateless across processes like the REINFORCE sampler (:mod:`kdforge.search.controller`): everything is
refitted from the study's COMPLETE trials, so several workers and a resumed search agree. Pool size,
exploration and predictor size are not given in the stored copy of the paper; ours are stated defaults.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.samplers import BaseSampler, RandomSampler
from optuna.study import Study, StudyDirection
from optuna.trial import FrozenTrial, TrialState
from scipy.stats import spearmanr

from kdforge.errors import KDForgeError
from kdforge.search.controller import check_choices

PREDICTED = "kdnas:predicted"


class RewardPredictor(torch.nn.Module):
    """r_hat(a): an LSTM over the embeddings of the candidate's choices, a linear head on its last state."""

    def __init__(self, sizes: Sequence[int], hidden: int = 32, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.embeddings = torch.nn.ModuleList(torch.nn.Embedding(n, hidden) for n in sizes)
            self.lstm = torch.nn.LSTM(hidden, hidden, batch_first=True)
            self.head = torch.nn.Linear(hidden, 1)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, T) choice indices -> (B,) predicted (standardised) rewards."""
        steps = torch.stack([emb(indices[:, t]) for t, emb in enumerate(self.embeddings)], dim=1)
        out, _ = self.lstm(steps)
        return self.head(out[:, -1]).squeeze(-1)


def fit_predictor(sizes: Sequence[int], candidates: Sequence[Sequence[int]], rewards: Sequence[float],
                  hidden: int = 32, epochs: int = 200, lr: float = 0.01, seed: int = 0
                  ) -> tuple[RewardPredictor, float, float]:
    """A predictor fitted to ``rewards`` (standardised), and the (mean, std) that map back to rewards."""
    r = torch.tensor(rewards, dtype=torch.float32)
    mean, std = float(r.mean()), float(r.std()) if len(r) > 1 and float(r.std()) > 0 else 1.0
    x, z = torch.tensor(candidates, dtype=torch.long), (r - mean) / std
    model = RewardPredictor(sizes, hidden, seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), z).backward()
        optimizer.step()
    return model.eval(), mean, std


def prediction_track(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per predictor episode (trials with a prediction, in trial order): the trial, its predicted and
    measured rewards, and the Spearman rank correlation of predicted vs measured over the episodes so far
    (None until three are in)."""
    chosen = [r for r in sorted(records, key=lambda r: r["number"])
              if r.get("predicted") is not None and r.get("reward") is not None and r["state"] == "COMPLETE"]
    track = []
    for k, r in enumerate(chosen, start=1):
        rho = None
        if k >= 3:
            predicted, measured = [c["predicted"] for c in chosen[:k]], [c["reward"] for c in chosen[:k]]
            value = spearmanr(predicted, measured).statistic
            rho = None if value is None or not math.isfinite(value) else float(value)
        track.append({"trial": r["number"], "predicted": r["predicted"], "reward": r["reward"], "spearman": rho})
    return track


class PredictorSampler(BaseSampler):
    """KD-NAS's predict-then-select controller as an Optuna sampler (see the module docstring).

    Args:
        choices: decision name -> list of choices.
        seed: seeds the warm-up draws, every pool and every predictor fit (>= 0).
        warmup: random episodes before the predictor chooses (at least 2: a fit needs rewards to differ).
        pool: candidates scored per episode. explore: probability of a random pool member instead of
        the predicted best. hidden, epochs, lr: the predictor and its fit.
    """

    def __init__(self, choices: dict[str, list], seed: int = 0, warmup: int = 5, pool: int = 100,
                 explore: float = 0.1, hidden: int = 32, epochs: int = 200, lr: float = 0.01):
        self._choices = check_choices(choices)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise KDForgeError(f"the search seed must be an integer >= 0, got {seed!r}")
        if warmup < 2 or pool < 1 or not 0 <= explore <= 1:
            raise KDForgeError(f"kdnas predictor: warmup >= 2, pool >= 1 and explore in [0, 1] (got {warmup}, "
                               f"{pool}, {explore})")
        self._seed, self._warmup, self._pool, self._explore = seed, warmup, pool, explore
        self._fit = {"hidden": hidden, "epochs": epochs, "lr": lr}
        self._space = {name: CategoricalDistribution(options) for name, options in self._choices.items()}
        self._sizes = [len(options) for options in self._choices.values()]

    def _rng(self, *keys: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([self._seed, *keys]))

    def _history(self, study: Study) -> list[tuple[tuple[int, ...], float]]:
        history = []
        for trial in sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.number):
            if trial.value is None or not math.isfinite(trial.value):
                continue
            if all(trial.params.get(n) in options for n, options in self._choices.items()):
                history.append((tuple(options.index(trial.params[n]) for n, options in self._choices.items()),
                                float(trial.value)))
        return history

    def _pool_of(self, rng: np.random.Generator, seen: set[tuple[int, ...]]) -> list[tuple[int, ...]]:
        total = math.prod(self._sizes)
        wanted = min(self._pool, total - len(seen)) if total > len(seen) else 0
        pool: list[tuple[int, ...]] = []
        for _ in range(50 * max(1, self._pool)):
            if len(pool) >= wanted:
                break
            candidate = tuple(int(rng.integers(n)) for n in self._sizes)
            if candidate not in seen and candidate not in pool:
                pool.append(candidate)
        return pool or [tuple(int(rng.integers(n)) for n in self._sizes)]  # every candidate seen: repeat one

    def choose(self, study: Study, number: int) -> tuple[tuple[int, ...], float | None]:
        """The candidate (choice indices) for trial ``number`` and its predicted reward (None in warm-up)."""
        history = self._history(study)
        rng = self._rng(number)
        if len(history) < self._warmup:
            return tuple(int(rng.integers(n)) for n in self._sizes), None
        pool = self._pool_of(rng, {h[0] for h in history})
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            model, mean, std = fit_predictor(self._sizes, [h[0] for h in history], [h[1] for h in history],
                                             seed=self._seed, **self._fit)
            with torch.no_grad():
                predicted = (model(torch.tensor(pool, dtype=torch.long)) * std + mean).tolist()
        finally:
            torch.set_num_threads(threads)
        pick = int(rng.integers(len(pool))) if rng.random() < self._explore else int(np.argmax(predicted))
        return pool[pick], float(predicted[pick])

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        if len(study.directions) != 1 or study.direction != StudyDirection.MAXIMIZE:
            raise KDForgeError("the KD-NAS sampler maximises one reward per trial: create the study with "
                               "direction='maximize'")
        return dict(self._space)

    def sample_relative(self, study: Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        if not search_space:
            return {}
        indices, predicted = self.choose(study, trial.number)
        if predicted is not None:
            study._storage.set_trial_system_attr(trial._trial_id, PREDICTED, predicted)  # as Optuna's own samplers
        return {name: options[i] for (name, options), i in zip(self._choices.items(), indices, strict=True)
                if name in search_space}

    def sample_independent(self, study: Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        seed = int(self._rng(trial.number, zlib.crc32(param_name.encode())).integers(2**31))
        return RandomSampler(seed=seed).sample_independent(study, trial, param_name, param_distribution)
