"""nestpatch: ship LLM safety updates as tiny, auditable NeST patches.

The format layer (:mod:`nestpatch.format`) depends on numpy only, so a patch can be
inspected and validated without torch or llama.cpp installed.
"""

__version__ = "0.1.0"
