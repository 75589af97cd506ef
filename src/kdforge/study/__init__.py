"""Studies: grids of whole jobs (rows x axis points x seeds) with shared teachers, run on Optuna
storage by one or many workers, and a report whose claims are decided by intervals.

``kdforge study CONFIG`` / :func:`kdforge.study`; the file format is in :mod:`kdforge.study.config`.
"""
