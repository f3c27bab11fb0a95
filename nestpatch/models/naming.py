"""Names of MLP weights across Hugging Face and GGUF, and which axis holds the neurons.

numpy-free and torch-free: converters, the runtime and audit all address neurons through here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import UnsupportedError
from ..format.constants import AXIS_COL, AXIS_ROW

#: Architectures whose MLP is gate_proj/up_proj/down_proj with the llama layout.
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text", "granite", "olmo2", "smollm3")
MODULE_AXIS = {"gate_proj": AXIS_ROW, "up_proj": AXIS_ROW, "down_proj": AXIS_COL}
_GGUF_MODULE = {"gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}

_HF_RE = re.compile(r"^(?:model\.|model\.language_model\.)?layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight$")
_FUSED_RE = re.compile(r"(gate_up_proj|ffn_gate_up|experts|ffn_(gate|up|down)_exps|ffn_(gate|up|down)_shexp)")


@dataclass(frozen=True)
class MLPRef:
    """One MLP projection: layer index and HF module name."""

    layer: int
    module: str

    @property
    def hf_name(self) -> str:
        return f"model.layers.{self.layer}.mlp.{self.module}.weight"

    @property
    def gguf_name(self) -> str:
        return f"blk.{self.layer}.{_GGUF_MODULE[self.module]}.weight"

    @property
    def axis(self) -> str:
        return MODULE_AXIS[self.module]


def parse_hf_name(name: str) -> MLPRef:
    """Parse ``model.layers.L.mlp.{gate,up,down}_proj.weight``; refuse fused or MoE tensors clearly."""
    m = _HF_RE.match(name)
    if m:
        return MLPRef(int(m.group(1)), m.group(2))
    if _FUSED_RE.search(name):
        raise UnsupportedError(f"tensor {name}: fused gate_up or mixture-of-experts MLP tensors are not supported")
    raise UnsupportedError(f"tensor {name}: not an MLP projection nestpatch can address (expected model.layers.N.mlp.(gate|up|down)_proj.weight)")


def hf_to_gguf(name: str) -> str:
    return parse_hf_name(name).gguf_name


def check_architecture(arch: str, label: str) -> str:
    """Return ``arch`` normalised, or raise naming the supported ones."""
    a = (arch or "").lower()
    if a.endswith("forcausallm"):
        a = a[: -len("forcausallm")]
    if a not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedError(f"{label}: architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    return a


def layer_and_module(name: str) -> tuple[str, str]:
    """``("7", "up_proj")`` for an MLP weight name; ``("other", name)`` for anything else (for summaries)."""
    try:
        ref = parse_hf_name(name)
    except UnsupportedError:
        return "other", name
    return str(ref.layer), ref.module
