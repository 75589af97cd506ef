"""Problem kinds (classification, regression, language modelling, ...): each a class registered by name
in :data:`PROBLEMS` that knows its loss, metric inputs, calibration and trivial baseline
(:mod:`kdforge.problems.base`). Importing :mod:`kdforge.problems.kinds` here fills the registry."""

from kdforge.problems.base import PROBLEMS, Problem, Scores
from kdforge.problems.kinds import Classification, LanguageModelling, Regression

__all__ = ["PROBLEMS", "Classification", "LanguageModelling", "Problem", "Regression", "Scores"]
