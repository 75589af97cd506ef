"""Two study workers on one study in a real PostgreSQL (the throwaway cluster of test_search_postgres):
every run is run once, by one of the two processes, and the report is written from the storage."""

from __future__ import annotations

import optuna
import pytest

from kdforge.cli import main
from tests.test_search_postgres import postgres_url  # noqa: F401  (fixture)
from tests.test_study import study_tree, two_workers_run_every_run_once  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow


def test_two_workers_share_one_postgresql_study(study_tree, postgres_url, tmp_path):  # noqa: F811
    study_tree.update(storage=postgres_url, study_name="pg-study", seeds=[0, 1, 2])
    path = tmp_path / "study.yaml"
    two_workers_run_every_run_once(study_tree, path, lambda: optuna.load_study(study_name="pg-study",
                                                                                storage=postgres_url))
    assert main(["study", str(path), "--report-only"]) == 0
    assert (tmp_path / "study" / "study.html").is_file()
