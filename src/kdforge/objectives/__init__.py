"""Loss terms, one file per method, registered by name in ``OBJECTIVES`` (see ``base.py``).

Importing the package registers every objective listed here.
"""

from kdforge.objectives import (  # noqa: F401
    bdkd,
    continuation,
    contrastive,
    controls,
    ctkd,
    dkd,
    hint,
    logit,
    nkd,
    pkd,
    relation,
    tinybert,
    word_kd,
)
