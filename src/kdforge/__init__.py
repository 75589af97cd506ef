"""kdforge: compress a trained model into a smaller, faster student and prove what was kept."""

__version__ = "0.1.0"

from kdforge.api import Distiller, distill, evaluate, finetune, load_student_weights, search, study  # noqa: E402
from kdforge.errors import KDForgeError  # noqa: E402

__all__ = ["Distiller", "KDForgeError", "distill", "evaluate", "finetune", "load_student_weights", "search", "study",
           "__version__"]
