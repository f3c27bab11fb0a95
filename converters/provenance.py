"""Keys that a fold writes into the output model's metadata (GGUF KV or safetensors metadata).

They let ``verify`` and ``revert`` work from the folded file alone: which patch was folded,
and the original bytes of everything the fold touched.
"""

from __future__ import annotations


class FoldKey:
    PATCH_DIGEST = "nestpatch.patch_digest"  # content digest of the folded patch
    POLICY_NAME = "nestpatch.policy.name"
    POLICY_VERSION = "nestpatch.policy.version"
    TOOL_VERSION = "nestpatch.tool_version"
    PRECISION = "nestpatch.precision"
    TARGETS = "nestpatch.targets"  # JSON list of touched tensor names
    REVERT = "nestpatch.revert"  # JSON: how to restore the original (see each converter)
    SOURCE_SHA256 = "nestpatch.source_sha256"  # sha256 of the input model file(s)
