"""Tasks: datasets with their label space and official metrics, registered by name in
:data:`kdforge.tasks.base.TASKS`. Importing the task modules here fills the registry, so
:func:`kdforge.tasks.base.build_task` finds every task while ``base`` imports none of its subclasses."""

from kdforge.tasks import language_model, text, vision  # noqa: F401  (registers the tasks)
