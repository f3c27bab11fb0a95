"""nestpatch.audit: what changed, what shipped, who signed it, and a picture of it.

Modules, one job each:
    diff        patch vs patch: neurons, clusters (adjusted Rand index), deltas, metadata
    verify      is a model exactly base + patch? (re-run fold, tensor-by-tensor) or its provenance
    signing     ed25519 keys, signing inside the patch, tamper diagnosis, require_signature
    html_report the self-contained HTML report; figures (matplotlib) and evalruns (eval summaries)
"""
