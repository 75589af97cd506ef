"""Two study workers on one study in a real PostgreSQL (the throwaway cluster of test_search_postgres):
every run is run once, by one of the two processes, and the report is written from the storage."""

from __future__ import annotations

import optuna
import pytest
import yaml

from kdforge.cli import main
from tests.test_search_postgres import postgres_url  # noqa: F401  (fixture)
from tests.test_study import study_tree, worker_processes  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow


def test_two_workers_share_one_postgresql_study(study_tree, postgres_url, tmp_path):  # noqa: F811
    study_tree.update(storage=postgres_url, study_name="pg-study", seeds=[0, 1, 2])
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study_tree))
    assert main(["study", str(path), "--report-only"]) == 0  # starts the study (runs nothing): workers join it
    workers = worker_processes(path, 2, ["--join"])
    errors = [w.communicate(timeout=900)[1].decode()[-800:] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], "\n---\n".join(errors)
    study = optuna.load_study(study_name="pg-study", storage=postgres_url)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(t.user_attrs["run"] for t in complete) == sorted(
        f"{row} / seed {s}" for row in ("ce only", "kd") for s in (0, 1, 2))  # every run once, none twice
    assert len({t.user_attrs["worker"] for t in complete}) == 2
    assert main(["study", str(path), "--report-only"]) == 0
    assert (tmp_path / "study" / "study.html").is_file()
