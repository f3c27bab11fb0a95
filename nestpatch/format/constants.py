"""Every name of the `.nestpatch` v1 format, in one place (normative text: spec/nestpatch-v1.md)."""

from __future__ import annotations

FILE_EXTENSION = ".nestpatch"

#: Version written by this implementation, and the major versions it reads.
FORMAT_VERSION = "1.0"
READABLE_MAJOR_VERSIONS = (1,)

#: Largest JSON header accepted (bytes). Real patches have headers of a few hundred KB.
MAX_HEADER_BYTES = 64 * 1024 * 1024
#: Largest dimension accepted for any tensor axis (guards hostile shapes).
MAX_DIM = 1 << 24
#: Largest layer count (and layer index + 1) accepted: bounds per-layer tables and figures.
MAX_LAYERS = 4096


class Meta:
    """Keys of the safetensors ``__metadata__`` map (all values are strings)."""

    FORMAT = "format"  # always FORMAT_NAME: lets any safetensors tool tell a patch apart
    VERSION = "nestpatch.version"
    DOCUMENT = "nestpatch.metadata"  # the JSON document described by Doc


FORMAT_NAME = "nestpatch"


class Doc:
    """Top-level keys of the JSON metadata document."""

    TARGETS = "targets"
    BASE = "base"
    POLICY = "policy"
    PROVENANCE = "provenance"
    EVALUATION = "evaluation"
    CONTENT_DIGEST = "content_digest"
    SIGNATURE = "signature"


class TargetKey:
    """Keys of one entry of ``targets``."""

    NAME = "name"  # Hugging Face weight name, e.g. model.layers.7.mlp.up_proj.weight
    AXIS = "axis"  # "row" or "col"
    SHAPE = "shape"  # [out_features, in_features] of the HF weight
    N_CLUSTERS = "n_clusters"
    DELTA_DTYPE = "delta_dtype"


class BaseKey:
    """Keys of ``base``: what model the patch was made for."""

    ARCHITECTURE = "architecture"
    N_LAYERS = "n_layers"
    D_MODEL = "d_model"
    N_FF = "n_ff"
    NAME = "name"
    REVISION = "revision"
    FINGERPRINT = "fingerprint"


class FingerprintKey:
    METHOD = "method"
    SIZE = "size"
    TOLERANCE = "tolerance"


class PolicyKey:
    NAME = "name"
    VERSION = "version"
    DESCRIPTION = "description"


class ProvenanceKey:
    TOOL = "tool"
    TOOL_VERSION = "tool_version"
    CREATED = "created"
    CONFIG = "config"
    SEED = "seed"
    DATA = "data"
    LIBRARIES = "libraries"
    TRAINABLE_PARAMETERS = "trainable_parameters"
    DETECTION = "detection"
    #: written by ``nestpatch select``: the rule, the validation settings and every candidate's figures
    SELECTION = "selection"


class SignatureKey:
    ALGORITHM = "algorithm"
    PUBLIC_KEY = "public_key"
    VALUE = "value"
    #: sha256 of each metadata section as signed: an unsigned hint that lets a failed check
    #: name the part that changed (tensors, or which sections); never used for the verdict
    SECTIONS = "sections"


AXIS_ROW = "row"
AXIS_COL = "col"
AXES = (AXIS_ROW, AXIS_COL)

#: Tensor name suffixes; a target's tensors are ``f"{target_name}/{suffix}"``.
T_INDICES = "indices"
T_CLUSTERS = "clusters"
T_DELTAS = "deltas"
T_SCALES = "scales"
T_SKETCH = "base_sketch"
TENSOR_SUFFIXES = (T_INDICES, T_CLUSTERS, T_DELTAS, T_SCALES, T_SKETCH)

#: Allowed stored dtypes (safetensors dtype names).
DELTA_DTYPES = ("F32", "F16", "BF16")
INDEX_DTYPE = "I32"
SKETCH_DTYPE = "F32"

#: Fingerprint defaults (see nestpatch.fingerprint).
SKETCH_METHOD = "rademacher-sketch-v1"
SKETCH_SIZE = 8
SKETCH_TOLERANCE = 0.35
