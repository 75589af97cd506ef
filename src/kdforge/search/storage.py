"""Optuna storage for the outer loops (search and study): the database that spreads trials over
processes and machines, with heartbeats so that a killed worker's trial is found and run again.

``sqlite:///PATH`` is an embedded database for workers on one machine; ``postgresql://USER@HOST:PORT/DB``
lets workers on many machines share one study.
"""

from __future__ import annotations

import re
import time
import warnings

from optuna.exceptions import ExperimentalWarning
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

from kdforge.errors import KDForgeError


def open_storage(url: str, heartbeat_s: int, key: str, what: str, retry_stale: bool = True) -> RDBStorage:
    """The storage of the ``what`` (search, study) at ``url`` (``key`` names the config key in errors).
    A trial whose worker sent no heartbeat for ``2 * heartbeat_s`` is failed by the next worker that
    looks; ``retry_stale`` enqueues it again with the same parameters (the search's candidates)."""
    if not re.match(r"^(sqlite|postgresql|postgresql\+\w+|mysql|mysql\+\w+)://", url):
        raise KDForgeError(f"{key} {url!r} is not a database URL; give sqlite:///PATH or "
                           "postgresql://USER@HOST:PORT/DB")
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    for attempt in range(3):  # workers starting together race to create the tables: the loser retries
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna since 2.8: used as documented
                warnings.simplefilter("ignore", ExperimentalWarning)
                retry = RetryHeartbeatStaleTrialCallback(max_retry=2) if retry_stale else None
                return RDBStorage(url, engine_kwargs=engine, heartbeat_interval=heartbeat_s,
                                  grace_period=2 * heartbeat_s, heartbeat_stale_trial_callback=retry)
        except Exception as err:  # noqa: BLE001  (sqlalchemy / driver errors of every kind)
            problem = str(err).splitlines()[0]
            time.sleep(0.5 * (attempt + 1))
    raise KDForgeError(f"cannot open the {what} storage {url}: {problem}; check {key} (the database must exist and "
                       "accept connections)")


def require_study(storage: RDBStorage, name: str, url: str, command: str) -> None:
    """``--join`` adds a worker to a study that exists: one line naming what to do when it does not (never a
    new study of its own, which would spend the trials elsewhere)."""
    if name not in {s.study_name for s in storage.get_all_studies()}:
        raise KDForgeError(f"--join: there is no {command} named {name!r} in {url} to join; start it first with "
                           f"`kdforge {command} CONFIG` (without --join), or point this worker at the storage and "
                           f"name it uses")
