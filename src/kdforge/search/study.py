"""The search's Optuna study: its storage (the engine that spreads a search over processes and
machines), its sampler (which method proposes candidates) and its pruner.

* Storage: ``search.storage`` or ``sqlite:///<output_dir>/study.db`` (an embedded database: several
  worker processes on one machine); a ``postgresql://user@host:port/db`` URL lets workers on many
  machines join one study by ``search.study_name``. Workers send a heartbeat every
  ``search.heartbeat_s``; a trial whose worker went silent for twice that is marked failed and run
  again (with the same candidate) by the next worker that starts a trial, so a killed worker loses
  only its running trial.
* Samplers: ``kdnas`` -> :class:`~kdforge.search.predictor.PredictorSampler` (the paper's controller: an
  LSTM reward predictor refitted on the study's finished trials, sending the predicted best of a random
  pool), or with ``search.controller: reinforce`` :class:`~kdforge.search.controller.KDNASSampler` (an
  LSTM policy learned by REINFORCE, replayed from the study's finished trials); ``autokd`` -> Optuna's multivariate TPE
  (Bayesian optimisation: Bergstra et al. 2011; random start-up trials: Optuna's 10, or a quarter of
  the budget when that is smaller, at least 3); ``random``
  -> uniform sampling. Every method searches the same space with the same seed.
* Pruner (``autokd`` with the reward objective): successive halving on the epochs of the proxy
  distillation (Optuna's ``SuccessiveHalvingPruner``, min resource 1 epoch, reduction factor 2), as
  AutoKD's multi-fidelity BO (Hyperband/BOHB); Optuna prunes single-objective studies only.
"""

from __future__ import annotations

from pathlib import Path

import optuna
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from kdforge.config import JobConfig
from kdforge.errors import KDForgeError
from kdforge.search.controller import KDNASSampler
from kdforge.search.predictor import PredictorSampler
from kdforge.search.space import SearchSpace
from kdforge.search.storage import open_storage

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def storage_url(config: JobConfig) -> str:
    return config.search.storage or f"sqlite:///{Path(config.output_dir).resolve() / 'study.db'}"


def study_name(config: JobConfig) -> str:
    return config.search.study_name or Path(config.output_dir).name


def make_storage(config: JobConfig) -> RDBStorage:
    return open_storage(storage_url(config), config.search.heartbeat_s, "search.storage", "search")


def make_sampler(config: JobConfig, space: SearchSpace) -> optuna.samplers.BaseSampler:
    search = config.search
    if search.method == "kdnas":
        if search.controller == "reinforce":
            return KDNASSampler(space.dimensions(), seed=search.seed)
        return PredictorSampler(space.dimensions(), seed=search.seed)
    if search.method == "autokd":
        startup = min(10, max(3, search.trials // 4))  # Optuna's 10 random start-up trials, fewer on small budgets
        return optuna.samplers.TPESampler(seed=search.seed, multivariate=True, n_startup_trials=startup)
    return optuna.samplers.RandomSampler(seed=search.seed)


def make_pruner(config: JobConfig) -> optuna.pruners.BasePruner:
    if config.search.method == "autokd" and config.search.objective == "reward":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=2)
    return optuna.pruners.NopPruner()


def directions(config: JobConfig, greater_is_better: bool) -> list[str]:
    if config.search.objective == "pareto":
        return ["maximize" if greater_is_better else "minimize", "minimize"]
    return ["maximize"]


def open_study(config: JobConfig, storage: RDBStorage, space: SearchSpace, greater_is_better: bool) -> optuna.Study:
    """Create the study or join it (same name in the same storage); its method and space must match."""
    wanted = {"method": config.search.method, "objective": config.search.objective,
              "space": {k: list(v) for k, v in space.dimensions().items()}}
    study = optuna.create_study(storage=storage, study_name=study_name(config), load_if_exists=True,
                                sampler=make_sampler(config, space), pruner=make_pruner(config),
                                directions=directions(config, greater_is_better))
    saved = study.user_attrs.get("search")
    if saved is None:
        study.set_user_attr("search", wanted)
    elif saved != wanted:
        raise KDForgeError(f"study {study.study_name!r} in {storage_url(config)} was started with {saved}, not "
                           f"{wanted}; use another search.study_name or output_dir, or the same search settings")
    return study


def finished_count(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))
