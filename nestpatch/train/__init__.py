"""nestpatch.train."""
