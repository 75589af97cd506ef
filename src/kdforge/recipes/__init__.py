"""Recipes: how a stage is assembled from a data source, roles and a strategy, and run.

The contracts and registries (``STRATEGIES``, ``DATA_SOURCES``) are in ``recipes/base.py``; each
strategy or data source is a module here, and ``recipes/catalog.py`` imports them all;
``recipes/teacher_sources.py`` gives a teacher role's outputs (live, cached or a black box);
``recipes/stage.py`` runs the stages.
"""
