"""The worked example of docs/design.md: a new strategy is one file in recipes/ registered by name;
it runs through the engine untouched (caching, checkpoints, evaluation) from a config."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest

from kdforge import jobs
from kdforge.config import validate_config
from kdforge.recipes.base import STRATEGIES

DESIGN = Path(__file__).parent.parent / "docs" / "design.md"


@pytest.fixture(scope="module")
def most_confident():
    """Load the example's code exactly as the design doc shows it."""
    code = re.search(r"```python\n# src/kdforge/recipes/most_confident.py\n(.*?)```", DESIGN.read_text(), re.S).group(1)
    if "most_confident" not in STRATEGIES:
        module = types.ModuleType("kdforge.recipes.most_confident")
        sys.modules[module.__name__] = module
        exec(compile(code, "most_confident.py", "exec"), module.__dict__)
    return STRATEGIES.get("most_confident")


@pytest.mark.slow
def test_the_documented_strategy_runs_from_a_config(tmp_path, job_tree, tiny_teacher_dir, most_confident):
    tree = {**job_tree, "teacher": {"model": str(tiny_teacher_dir)},
            "teachers": {"t2": {"model": str(tiny_teacher_dir)}},
            "stages": [{"name": "distill", "objectives": [{"name": "ce"}], "strategy": {"name": "most_confident",
                                                                                     "temperature": 2.0}}],
            "teacher_cache": {"folder": str(tmp_path / "cache")}}
    result = jobs.run_distill(validate_config(tree))
    assert result.student.metrics["accuracy"] > 0.5
    history = result.run_dir / "metrics.json"
    assert history.is_file()
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1  # both roles share one frozen model: one cache entry
    engine = Path(__file__).parent.parent / "src" / "kdforge" / "engine"
    assert not any("most_confident" in f.read_text() for f in engine.glob("*.py"))
