"""The roles of a job and their one owner.

A role is a name in the job's config: ``teacher`` (the primary teacher) and the named ``teachers``, the
``assistants`` and the ``student``. Everything kdforge does with a role as such is asked of this package:

* :mod:`kdforge.roles.base`: what a role can give (:class:`~kdforge.roles.base.Capabilities`: logits only for
  a black box; hidden states, attention maps and hooked features, weights to train, export and time for a
  model), the primary teacher and a teacher's config key. It imports only the config, so every layer
  (preflight, recipes, the report) may ask it.
* :mod:`kdforge.roles.teachers`: a teacher's lifecycle: its fingerprint, found again by it, else
  fine-tuned (:func:`~kdforge.roles.teachers.find_or_finetune_teacher`), or a black box behind its client.
* :mod:`kdforge.roles.loading`: every role's model for a job (:func:`~kdforge.roles.loading.load_models`)
  and a finished run's models by role (:func:`~kdforge.roles.loading.load_run_model`).

This module imports nothing, so that importing :mod:`kdforge.roles.base` stays cheap and cycle-free.
"""
