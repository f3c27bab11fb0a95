"""GGUF block quantize/dequantize round trips in torch, for quantization-aware training.

Re-implements ggml's reference encoders (``quantize_row_*_ref``) for the legacy block types so a
delta can be trained through the exact rounding that folding into a GGUF file applies. The round
trip is wrapped in a straight-through estimator: the forward pass sees the quantized weights, the
backward pass treats the rounding as identity (``w + (q(w) - w).detach()``). Checked against
gguf-py's numpy quantizers in tests/test_train.py.

All types use blocks of 32 consecutive values along the last axis; the block scale (and min)
are stored as float16, which is reproduced here.
"""

from __future__ import annotations

import torch

BLOCK = 32
SUPPORTED = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")


def _f16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).to(torch.float32)


def roundtrip(w: torch.Tensor, qtype: str) -> torch.Tensor:
    """``dequantize(quantize(w))`` for a GGUF block type; ``w``: ``(..., d)`` with ``d % 32 == 0``.

    Computed in float32 without gradients (use :func:`fake_quant` for the STE).
    """
    if qtype not in SUPPORTED:
        raise ValueError(f"quantization-aware training supports {', '.join(SUPPORTED)}, not {qtype}")
    if w.shape[-1] % BLOCK:
        raise ValueError(f"row length {w.shape[-1]} is not a multiple of {BLOCK}")
    with torch.no_grad():
        x = w.detach().float().reshape(*w.shape[:-1], -1, BLOCK)  # (..., nb, 32)
        if qtype == "Q8_0":
            amax = x.abs().amax(-1, keepdim=True)
            d = amax / 127.0
            idv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
            v = x * idv
            q = torch.sign(v) * torch.floor(v.abs() + 0.5)  # ggml: roundf (half away from zero)
            out = q * _f16(d)
        elif qtype in ("Q4_0", "Q5_0"):
            nlev = 16 if qtype == "Q4_0" else 32
            half = nlev // 2
            # the value of largest magnitude, with its sign
            idx = x.abs().argmax(-1, keepdim=True)
            mx = torch.gather(x, -1, idx)
            d = mx / -half
            idv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
            q = torch.trunc(x * idv + half + 0.5).clamp(min=0, max=nlev - 1)  # MIN(15, (int8_t)(x0 + 8.5f))
            out = (q - half) * _f16(d)
        else:  # Q4_1, Q5_1
            nlev = 16 if qtype == "Q4_1" else 32
            mn, mxv = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
            d = (mxv - mn) / (nlev - 1)
            idv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
            q = torch.trunc((x - mn) * idv + 0.5).clamp(max=nlev - 1)  # MIN(15, (int8)(x0 + 0.5f))
            out = q * _f16(d) + _f16(mn)
        return out.reshape(w.shape).to(w.dtype)


def fake_quant(w: torch.Tensor, qtype: str) -> torch.Tensor:
    """Straight-through estimator: forward ``roundtrip(w)``, backward identity."""
    return w + (roundtrip(w, qtype) - w).detach()
