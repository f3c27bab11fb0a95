"""nestpatch.evaluate."""
