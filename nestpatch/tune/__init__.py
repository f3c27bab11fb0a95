"""``nestpatch tune``: find a model's NeST recipe by a multi-objective search on validation data.

:mod:`.session` trains many configs on one loaded model (shared with ``benchmarks/train_sweep.py``),
:mod:`.validation` holds the tuning sets and measures (shared with ``benchmarks/tune_eval.py``),
:mod:`.space` the search space, :mod:`.study` the Optuna study and its outputs.
"""
