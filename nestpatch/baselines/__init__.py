"""nestpatch.baselines."""
