"""The output precisions of a fold, in a module with no heavy imports (the CLI builds its flags from it).

``keep``: every touched tensor keeps its type; ``auto``: keeps it when the re-encoding retains
enough of the change, else Q8_0 (then F16); ``q8_0`` / ``f16``: touched tensors below that
precision are stored at it. :func:`nestpatch.converters.gguf_fold.candidate_types` is the rule.
"""

PRECISIONS = ("keep", "auto", "q8_0", "f16")
