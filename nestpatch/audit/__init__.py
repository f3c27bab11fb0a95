"""nestpatch.audit."""
