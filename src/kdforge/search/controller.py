"""KD-NAS controller: an LSTM policy over student architectures, trained with REINFORCE.

KD-NAS (Trivedi et al., "Neural Architecture Search for Effective Teacher-Student Knowledge Transfer
in Language Models", 2023) searches the student with the controller of Zoph & Le ("Neural
Architecture Search with Reinforcement Learning", ICLR 2017) and ENAS (Pham et al., ICML 2018):

* :class:`LSTMController` -- an autoregressive policy ``pi_theta``. Decision ``t`` (e.g. number of
  layers, hidden size, ...) is one LSTMCell step whose input is the embedding of the choice made at
  decision ``t - 1`` (a learned start token for ``t = 0``); a linear head per decision maps the
  hidden state to logits over that decision's choices. A candidate ``a = (a_1..a_T)`` has
  ``log pi(a) = sum_t log softmax(logits_t)[a_t]``.
* :class:`ControllerTrainer` -- REINFORCE (Williams, 1992) with a moving-average baseline ``b``:
  ``loss = -(R - b) * log pi(a) - entropy_weight * H(pi(.|a))``, one Adam step per candidate, then
  ``b <- decay * b + (1 - decay) * R``. ``R`` is the candidate's reward (e.g.
  :func:`kdforge.search.reward.mnas_reward`).
* :class:`KDNASSampler` -- the controller as an Optuna sampler: each trial's architecture is drawn
  from the policy learned on all completed trials so far.

Differences from the paper's setup (kept deliberately small):

* one candidate per controller update (batch size 1, baseline instead of a batch mean), and
  asynchronous: a candidate proposed while other trials still run is drawn from the policy learned
  on the trials completed at that moment (as Zoph & Le's asynchronous workers);
* no weight sharing between candidates (not ENAS's one-shot supernet): each candidate is a student
  distilled and evaluated on its own, so the reward is that student's real score and latency.
"""

from __future__ import annotations

import math
import threading
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.samplers import BaseSampler, RandomSampler
from optuna.study import Study, StudyDirection
from optuna.trial import FrozenTrial, TrialState

from kdforge.errors import KDForgeError

__all__ = ["ControllerTrainer", "KDNASSampler", "LSTMController"]

_INIT_RANGE = 0.08  # Zoph & Le initialise every controller weight uniformly in [-0.08, 0.08]


def check_choices(choices: Mapping[str, Sequence[Any]]) -> dict[str, list[Any]]:
    if not isinstance(choices, Mapping) or not choices:
        raise KDForgeError("the student search space is empty; give at least one decision with its list of choices")
    checked: dict[str, list[Any]] = {}
    for name, options in choices.items():
        if not isinstance(name, str) or not name:
            raise KDForgeError(f"search space decision names must be non-empty strings, got {name!r}")
        if isinstance(options, (str, bytes)) or not isinstance(options, Sequence) or len(options) == 0:
            raise KDForgeError(f"search space decision {name!r} needs a non-empty list of choices, got {options!r}")
        for option in options:
            if option is not None and not isinstance(option, (bool, int, float, str)):
                raise KDForgeError(
                    f"search space decision {name!r} has choice {option!r} of type {type(option).__name__}; "
                    "choices must be ints, floats, strings, booleans or null"
                )
        if len(set(options)) != len(options):
            raise KDForgeError(f"search space decision {name!r} lists a choice twice: {list(options)!r}")
        checked[name] = list(options)
    return checked


class LSTMController(torch.nn.Module):
    """Autoregressive LSTM policy over the decisions of ``choices`` (in their insertion order).

    Args:
        choices: decision name -> list of its choices (only their number matters here).
        hidden: LSTM hidden size (also the size of the choice embeddings and start token).
        seed: seed of the weight initialisation (uniform in [-0.08, 0.08], Zoph & Le); the global
            torch RNG is left untouched.
    """

    def __init__(self, choices: dict[str, list], hidden: int = 32, seed: int = 0):
        super().__init__()
        choices = check_choices(choices)
        if int(hidden) < 1:
            raise KDForgeError(f"the controller hidden size must be >= 1, got {hidden!r}")
        self.names: list[str] = list(choices)
        self.sizes: list[int] = [len(options) for options in choices.values()]
        self.hidden = int(hidden)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            self.start = torch.nn.Parameter(torch.empty(1, self.hidden))
            self.cell = torch.nn.LSTMCell(self.hidden, self.hidden)
            self.heads = torch.nn.ModuleList(torch.nn.Linear(self.hidden, size) for size in self.sizes)
            # the choice of decision t is the input of step t + 1: the last decision needs no embedding
            self.embeddings = torch.nn.ModuleList(torch.nn.Embedding(size, self.hidden) for size in self.sizes[:-1])
            for parameter in self.parameters():
                torch.nn.init.uniform_(parameter, -_INIT_RANGE, _INIT_RANGE)

    def _index_list(self, indices: Mapping[str, int]) -> list[int]:
        chosen = []
        for name, size in zip(self.names, self.sizes, strict=True):
            if name not in indices:
                raise KDForgeError(f"controller decision {name!r} is missing from the given indices {dict(indices)!r}")
            index = int(indices[name])
            if not 0 <= index < size:
                raise KDForgeError(f"controller decision {name!r} has {size} choices, got index {index}")
            chosen.append(index)
        return chosen

    def _rollout(
        self, chosen: list[int] | None, generator: torch.Generator | None
    ) -> tuple[list[int], torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Run the LSTM over all decisions, sampling (``chosen is None``) or teacher-forcing ``chosen``."""
        h = torch.zeros(1, self.hidden)
        c = torch.zeros(1, self.hidden)
        x = self.start
        picked: list[int] = []
        log_prob = torch.zeros(())
        entropy = torch.zeros(())
        probs_per_step = []
        for step in range(len(self.names)):
            h, c = self.cell(x, (h, c))
            log_p = torch.log_softmax(self.heads[step](h).squeeze(0), dim=-1)
            p = log_p.exp()
            if chosen is None:
                index = int(torch.multinomial(p.detach(), 1, generator=generator).item())
            else:
                index = chosen[step]
            picked.append(index)
            log_prob = log_prob + log_p[index]
            entropy = entropy - (p * log_p).sum()
            probs_per_step.append(p)
            if step < len(self.names) - 1:
                x = self.embeddings[step](torch.tensor([index]))
        return picked, log_prob, entropy, probs_per_step

    def sample(self, generator: torch.Generator | None = None) -> tuple[dict[str, int], torch.Tensor, torch.Tensor]:
        """Draw one candidate: (decision -> choice index, log pi(candidate), summed per-step entropy)."""
        picked, log_prob, entropy, _ = self._rollout(None, generator)
        return dict(zip(self.names, picked, strict=True)), log_prob, entropy

    def log_prob(self, indices: Mapping[str, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``log pi(indices)`` and the summed entropy of each step's distribution along that path."""
        _, log_prob, entropy, _ = self._rollout(self._index_list(indices), None)
        return log_prob, entropy

    def probabilities(self, indices: Mapping[str, int]) -> dict[str, torch.Tensor]:
        """Each decision's probability vector, conditioned on the earlier decisions of ``indices``."""
        _, _, _, probs = self._rollout(self._index_list(indices), None)
        return dict(zip(self.names, probs, strict=True))


class ControllerTrainer:
    """REINFORCE with a moving-average baseline for an :class:`LSTMController`.

    ``update(indices, reward)``: ``advantage = reward - baseline``; ``loss = -advantage * log pi(indices)
    - entropy_weight * entropy``; one Adam step (``lr``); then ``baseline <- baseline_decay * baseline +
    (1 - baseline_decay) * reward``. The baseline starts at the first reward, so the first update has
    advantage 0 (only the entropy bonus acts): with no earlier candidate there is nothing to compare to.
    """

    def __init__(
        self,
        controller: LSTMController,
        lr: float = 0.01,
        baseline_decay: float = 0.9,
        entropy_weight: float = 1e-3,
    ):
        if not (math.isfinite(lr) and lr > 0):
            raise KDForgeError(f"the controller learning rate must be > 0, got {lr!r}")
        if not 0 <= baseline_decay < 1:
            raise KDForgeError(f"the controller baseline_decay must be in [0, 1), got {baseline_decay!r}")
        if not (math.isfinite(entropy_weight) and entropy_weight >= 0):
            raise KDForgeError(f"the controller entropy_weight must be >= 0, got {entropy_weight!r}")
        self.controller = controller
        self.optimizer = torch.optim.Adam(controller.parameters(), lr=lr)
        self.baseline_decay = float(baseline_decay)
        self.entropy_weight = float(entropy_weight)
        self.baseline: float | None = None
        self.steps = 0

    def update(self, indices: Mapping[str, int], reward: float) -> float:
        """One REINFORCE step on candidate ``indices`` with ``reward``; returns the advantage used."""
        reward = float(reward)
        if not math.isfinite(reward):
            raise KDForgeError(f"the controller reward must be a finite number, got {reward!r}")
        if self.baseline is None:
            self.baseline = reward
        advantage = reward - self.baseline
        log_prob, entropy = self.controller.log_prob(indices)
        loss = -advantage * log_prob - self.entropy_weight * entropy
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.baseline = self.baseline_decay * self.baseline + (1 - self.baseline_decay) * reward
        self.steps += 1
        return advantage


class KDNASSampler(BaseSampler):
    """Optuna sampler whose searched decisions come from a REINFORCE-trained :class:`LSTMController`.

    What is learned: the controller's policy over the decisions in ``choices``; each COMPLETE trial is
    one REINFORCE episode with ``reward = trial.value`` (single objective, ``direction="maximize"``;
    e.g. :func:`kdforge.search.reward.mnas_reward`).

    Stateless across processes: the sampler keeps no state that is not in the study. For a new trial
    it rebuilds the controller from ``seed`` and replays the REINFORCE updates over the study's
    COMPLETE trials in order of trial number (params -> choice indices, reward = value), then draws
    the new trial's decisions with a generator seeded by ``(seed, trial.number)``. So several workers
    sharing one storage, or a search resumed after a kill, learn from every finished candidate, and a
    given storage always proposes the same next candidate. Within one process the replayed controller
    is cached and only trials completed since are replayed when the history only grew (same result
    as a full replay, just faster).

    Completed trials are skipped by the replay when they lack a searched parameter, hold a value
    outside ``choices`` or have a non-finite value: the objective must suggest every decision with
    ``trial.suggest_categorical(name, choices[name])``. Parameters outside ``choices`` are drawn by a
    :class:`~optuna.samplers.RandomSampler` seeded by ``(seed, trial.number, name)``.

    Args:
        choices: decision name -> list of choices (ints, floats, strings); the order of the
            decisions is the order in which the controller takes them.
        seed: seed of the controller initialisation and of every trial's draw (>= 0).
        hidden, lr, baseline_decay, entropy_weight: see :class:`LSTMController` and
            :class:`ControllerTrainer`.
    """

    def __init__(
        self,
        choices: dict[str, list],
        seed: int = 0,
        hidden: int = 32,
        lr: float = 0.01,
        baseline_decay: float = 0.9,
        entropy_weight: float = 1e-3,
    ):
        self._choices = check_choices(choices)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise KDForgeError(f"the search seed must be an integer >= 0, got {seed!r}")
        self._seed = seed
        self._hidden = int(hidden)
        self._lr = float(lr)
        self._baseline_decay = float(baseline_decay)
        self._entropy_weight = float(entropy_weight)
        self._space = {name: CategoricalDistribution(options) for name, options in self._choices.items()}
        self._new_trainer()  # validates the controller settings now, not at the first trial
        self._lock = threading.RLock()
        self._cache: tuple[list[tuple[tuple[int, ...], float]], ControllerTrainer] | None = None

    def _new_trainer(self) -> ControllerTrainer:
        controller = LSTMController(self._choices, hidden=self._hidden, seed=self._seed)
        return ControllerTrainer(controller, self._lr, self._baseline_decay, self._entropy_weight)

    def _history(self, study: Study) -> list[tuple[tuple[int, ...], float]]:
        """(choice indices, reward) of the study's usable COMPLETE trials, in trial-number order."""
        history = []
        trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        for trial in sorted(trials, key=lambda t: t.number):
            value = trial.value
            if value is None or not math.isfinite(value):
                continue
            indices = []
            for name, options in self._choices.items():
                if name not in trial.params or trial.params[name] not in options:
                    break
                indices.append(options.index(trial.params[name]))
            else:
                history.append((tuple(indices), float(value)))
        return history

    def _trained(self, study: Study) -> ControllerTrainer:
        history = self._history(study)
        with self._lock:
            if self._cache is not None and self._cache[0] == history[: len(self._cache[0])]:
                done, trainer = self._cache
            else:
                done, trainer = [], self._new_trainer()
            for indices, reward in history[len(done) :]:
                trainer.update(dict(zip(self._choices, indices, strict=True)), reward)
            self._cache = (history, trainer)
            return trainer

    def policy(self, study: Study) -> LSTMController:
        """The controller trained on ``study``'s completed trials (e.g. to report the learned probabilities).

        The returned module is the sampler's cached copy: read it, do not train it.
        """
        return self._trained(study).controller

    def _trial_seed(self, *keys: int) -> int:
        return int(np.random.SeedSequence([self._seed, *keys]).generate_state(1)[0])

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        if len(study.directions) != 1 or study.direction != StudyDirection.MAXIMIZE:
            raise KDForgeError(
                "the KD-NAS sampler maximises one reward per trial: create the study with direction='maximize'"
            )
        return dict(self._space)

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        if not search_space:
            return {}
        generator = torch.Generator().manual_seed(self._trial_seed(trial.number))
        threads = torch.get_num_threads()
        with self._lock:  # one lock over replay and draw: threads (n_jobs > 1) share the cached controller
            torch.set_num_threads(1)  # tiny tensors: ~1 ms per update on one thread, ~50 ms on a busy many
            try:
                controller = self._trained(study).controller
                with torch.no_grad():
                    indices, _, _ = controller.sample(generator)
            finally:
                torch.set_num_threads(threads)
        return {name: self._choices[name][index] for name, index in indices.items() if name in search_space}

    def sample_independent(
        self,
        study: Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        seed = self._trial_seed(trial.number, zlib.crc32(param_name.encode()))
        return RandomSampler(seed=seed).sample_independent(study, trial, param_name, param_distribution)
