"""Text tasks: GLUE (``glue/sst2``, ``glue/mrpc``, ``glue/rte``, ``glue/cola``, ``glue/stsb``), the
generic ``csv`` / ``jsonl`` file tasks and ``hf_dataset`` (a Hugging Face ``datasets`` dataset).

Importing this module registers all of them in :data:`kdforge.tasks.base.TASKS`; the code lives in
:mod:`kdforge.tasks.glue`, :mod:`kdforge.tasks.text_files`, :mod:`kdforge.tasks.hf_dataset` and the shared
:mod:`kdforge.tasks.text_base`.
"""

from kdforge.tasks.glue import MRPC, RTE, SST2, STSB, CoLA, GlueTask
from kdforge.tasks.hf_dataset import HFDatasetTask
from kdforge.tasks.text_base import TextCollator, TextTask
from kdforge.tasks.text_files import CsvTask, FileTask, JsonlTask

__all__ = ["CoLA", "CsvTask", "FileTask", "GlueTask", "HFDatasetTask", "JsonlTask", "MRPC", "RTE", "SST2", "STSB",
           "TextCollator", "TextTask"]
