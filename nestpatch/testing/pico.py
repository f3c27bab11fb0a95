"""Pico models: tiny random Llamas written as real HF directories and real GGUF files.

Why: every converter, runtime and audit path must be tested on the real file formats with the
real libraries (transformers, safetensors, llama-cpp-python), in seconds. A 2-layer Llama with
d_model 64 and SmolLM2's real tokenizer (vocab 49152, ChatML template) is small enough for
that and real enough that llama.cpp loads it and its logits match transformers'.

The GGUF writer mirrors what llama.cpp's HF converter does for llama: same tensor names (gguf's
name map), the Q/K row permutation (llama.cpp's rope pairs adjacent values, HF's rotate_half
pairs the two halves of each head), norms in F32, and the tokenizer KV entries copied from the
real SmolLM2 GGUF.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..assets import fetch, home
from ..atomic import atomic_dir, atomic_path
from ..baselines.fold import QK_PERMUTED, gguf_tensor_name, permute_qk  # the converter's layout, one home
from ..errors import UnsupportedError
from ..format.constants import AXIS_ROW
from ..format.patch import Patch, Target
from ..models.naming import MODULE_AXIS

log = logging.getLogger(__name__)

#: Defaults of make_pico_model (overridable per call).
PICO_DEFAULTS: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=49152,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    # 0.1 rather than transformers' 0.02: the logits then spread over a few units, so patch
    # effects and format differences show up as real numbers instead of noise around zero.
    initializer_range=0.1,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)

_TOKENIZER_DIR = "pico/tokenizer"
_TOKENIZER_KV = "pico/tokenizer_kv.json"

#: file_type KV written for each whole-file type (gguf.LlamaFileType values).
_FILE_TYPE = {
    "F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "Q8_0": "MOSTLY_Q8_0",
    "Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1", "Q5_0": "MOSTLY_Q5_0", "Q5_1": "MOSTLY_Q5_1",
    "Q2_K": "MOSTLY_Q2_K", "Q3_K": "MOSTLY_Q3_K_M", "Q4_K": "MOSTLY_Q4_K_M", "Q5_K": "MOSTLY_Q5_K_M",
    "Q6_K": "MOSTLY_Q6_K",
}


# ------------------------------------------------------------------------------------------ tokenizer


@functools.lru_cache(maxsize=1)
def smollm2_tokenizer() -> Any:
    """SmolLM2's real tokenizer (vocab 49152, ChatML template), cached on disk and in memory.

    The first call reads it out of the fetched SmolLM2 GGUF (a few seconds) and saves it under
    ``$NESTPATCH_HOME/pico/tokenizer``; later calls (any process) load that in well under a second.
    """
    from transformers import AutoTokenizer

    cache = home() / _TOKENIZER_DIR
    if not (cache / "tokenizer.json").exists():
        gguf_path = fetch("smollm2")
        log.info("extracting SmolLM2's tokenizer from %s into %s", gguf_path, cache)
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        cache.parent.mkdir(parents=True, exist_ok=True)
        try:
            with atomic_dir(cache) as tmp:
                tok.save_pretrained(str(tmp))
        except OSError:  # another process won the race; its copy is as good as ours
            if not (cache / "tokenizer.json").exists():
                raise
    tok = AutoTokenizer.from_pretrained(str(cache))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


@functools.lru_cache(maxsize=1)
def _smollm2_tokenizer_kv() -> tuple[tuple[str, Any, Any, Any], ...]:
    """``(key, value, type, sub_type)`` of every ``tokenizer.*`` KV entry of the real SmolLM2 GGUF.

    Parsing the 98k strings with GGUFReader takes seconds, so the entries are cached once as
    JSON under ``$NESTPATCH_HOME/pico/tokenizer_kv.json`` (loads in ~0.1 s).
    """
    from gguf import GGUFReader, GGUFValueType

    cache = home() / _TOKENIZER_KV
    if cache.exists():
        rows = json.loads(cache.read_text(encoding="utf-8"))
        return tuple((k, v, GGUFValueType(t), None if s is None else GGUFValueType(s)) for k, v, t, s in rows)
    reader = GGUFReader(str(fetch("smollm2")))
    out = []
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub = field.types[1] if vtype == GGUFValueType.ARRAY and len(field.types) > 1 else None
        out.append((key, field.contents(), vtype, sub))
    cache.parent.mkdir(parents=True, exist_ok=True)
    rows = [[k, v, int(t), None if s is None else int(s)] for k, v, t, s in out]
    with atomic_path(cache) as tmp:
        tmp.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return tuple(out)


# ------------------------------------------------------------------------------------------ model


def make_pico_model(seed: int = 0, *, arch: str = "llama", **config_overrides: Any) -> Any:
    """A random ``LlamaForCausalLM`` (float32, eval mode); defaults in :data:`PICO_DEFAULTS`.

    ``arch="qwen2"`` gives a ``Qwen2ForCausalLM`` of the same shape instead (q/k/v biases, and
    llama.cpp stores its q/k rows unpermuted): the Qwen models' code paths on a pico model.
    K-quant GGUFs need every row length to be a multiple of 256: use ``hidden_size=256``.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
    if arch not in classes:
        raise UnsupportedError(f"make_pico_model: architecture {arch!r}; expected one of {', '.join(classes)}")
    config_cls, model_cls = classes[arch]
    cfg = config_cls(**{**PICO_DEFAULTS, **config_overrides})
    devnull = torch.random.fork_rng(devices=[])  # leave the caller's global RNG untouched
    with devnull:
        torch.manual_seed(seed)
        model = model_cls(cfg)
        if arch == "qwen2":  # transformers zeroes the biases; random ones make a layout mistake visible
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if name.endswith(".bias"):
                        p.normal_(0.0, float(cfg.initializer_range))
    model.to(torch.float32)
    model.eval()
    model.requires_grad_(False)
    return model


def write_hf_dir(model: Any, out_dir: str | os.PathLike, *, dtype: str = "float32",
                 max_shard_size: str | int | None = None, tokenizer: bool = True) -> Path:
    """Save ``model`` as a real HF directory (config, safetensors, index when sharded, tokenizer).

    Args:
        dtype: ``float32``, ``float16`` or ``bfloat16`` for the stored weights.
        max_shard_size: e.g. ``"2MB"`` to get several shards and a ``model.safetensors.index.json``.
    """
    import torch

    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    out = Path(out_dir)
    m = model if torch_dtype == torch.float32 else copy.deepcopy(model).to(torch_dtype)
    kwargs: dict[str, Any] = {"safe_serialization": True}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out) as tmp:
        m.save_pretrained(str(tmp), **kwargs)
        if tokenizer:
            smollm2_tokenizer().save_pretrained(str(tmp))
    return out


# ------------------------------------------------------------------------------------------ GGUF


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of :func:`permute_qk` (llama.cpp order -> HF order)."""
    out_f = w.shape[0]
    return w.reshape(n_head, out_f // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_arch(config: Any) -> tuple[str, bool]:
    """``(GGUF architecture, q/k rows permuted?)`` of an HF config (the model types share their GGUF names)."""
    kind = str(getattr(config, "model_type", "llama"))
    if kind not in QK_PERMUTED:
        raise UnsupportedError(f"write_gguf: model type {kind!r}; expected one of {', '.join(QK_PERMUTED)}")
    return kind, QK_PERMUTED[kind]


def gguf_tensors(model: Any) -> list[tuple[str, np.ndarray]]:
    """``(gguf_name, float32 array in GGUF numpy layout)`` of every tensor, in file order.

    Tied embeddings: only ``token_embd`` is written (llama.cpp reuses it as the output layer).
    """
    cfg = model.config
    n_layers = int(cfg.num_hidden_layers)
    arch, permuted = gguf_arch(cfg)
    sd = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    out: list[tuple[str, np.ndarray]] = []
    for name, arr in sd.items():
        if name == "lm_head.weight" and tied:
            continue
        if "rotary_emb" in name:
            continue
        if permuted and name.endswith("q_proj.weight"):
            arr = permute_qk(arr, int(cfg.num_attention_heads))
        elif permuted and name.endswith("k_proj.weight"):
            arr = permute_qk(arr, int(cfg.num_key_value_heads))
        out.append((gguf_tensor_name(name, arch, n_layers), np.ascontiguousarray(arr, dtype=np.float32)))
    return out


def write_gguf(model: Any, out_path: str | os.PathLike, *, qtype: str = "F32",
               tensor_types: dict[str, str] | None = None) -> Path:
    """Write ``model`` as a GGUF that llama.cpp loads (llama or qwen2 architecture), with SmolLM2's tokenizer.

    Every 2-D weight is stored as ``qtype``; norms stay F32. A weight whose row length is not a
    multiple of the type's block size is stored as F32 (as llama.cpp's converter falls back).

    Args:
        qtype: F32 F16 BF16 Q8_0 Q4_0 Q4_1 Q5_0 Q5_1 Q2_K Q3_K Q4_K Q5_K Q6_K (K-quants encode through
            llama-cpp-python's libggml and need rows of 256: ``hidden_size=256`` and an n_ff multiple of 256).
        tensor_types: per-tensor overrides by GGUF name (``{"blk.0.ffn_up.weight": "IQ4_NL"}``); any type
            libggml encodes without an importance matrix works here (to test mixed and exotic files).
    """
    import gguf

    from nestpatch.converters import gguf_codecs as codecs

    qt = codecs.qtype_of(qtype)
    if qt not in codecs.ENCODABLE:
        raise UnsupportedError(f"write_gguf: type {qtype} is not supported")
    cfg = model.config
    vocab = int(cfg.vocab_size)
    tok_kv = _smollm2_tokenizer_kv()
    n_tokens = next((len(v) for k, v, _, _ in tok_kv if k == gguf.Keys.Tokenizer.LIST), vocab)
    if n_tokens != vocab:
        raise UnsupportedError(f"write_gguf: SmolLM2's tokenizer has {n_tokens} tokens, the model's vocab is {vocab}")
    rope = getattr(cfg, "rope_parameters", None) or {}
    rope_theta = float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)

    out = Path(out_path)
    arch, _ = gguf_arch(cfg)
    with atomic_path(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch)
        w.add_name(f"pico-{arch}")
        w.add_type("model")
        w.add_context_length(int(cfg.max_position_embeddings))
        w.add_embedding_length(int(cfg.hidden_size))
        w.add_block_count(int(cfg.num_hidden_layers))
        w.add_feed_forward_length(int(cfg.intermediate_size))
        w.add_head_count(int(cfg.num_attention_heads))
        w.add_head_count_kv(int(cfg.num_key_value_heads))
        w.add_rope_dimension_count(head_dim)
        w.add_rope_freq_base(rope_theta)
        w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
        w.add_vocab_size(vocab)
        w.add_file_type(int(gguf.LlamaFileType[_FILE_TYPE[qt.name]]))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for key, value, vtype, sub in tok_kv:
            w.add_key_value(key, value, vtype, sub_type=sub)
        overrides = {k: codecs.qtype_of(v) for k, v in (tensor_types or {}).items()}
        for name, arr in gguf_tensors(model):
            t = overrides.get(name, qt if arr.ndim == 2 else codecs.QType.F32)
            if arr.ndim == 2 and arr.shape[1] % codecs.block_size(t):
                log.warning("%s: row length %d is not a multiple of %d; stored as F32", name, arr.shape[1], codecs.block_size(t))
                t = codecs.QType.F32
            if t == codecs.QType.F32:
                w.add_tensor(name, arr)
            else:
                rows = arr.reshape(-1, arr.shape[-1])
                raw = codecs.quantize_rows(rows, t) if t in codecs.ENCODABLE else codecs.ggml_quantize(rows, t)  # (rows, row_bytes)
                w.add_tensor(name, raw.reshape(*arr.shape[:-1], raw.shape[-1]), raw_dtype=t)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=False)
        w.close()
    return out


# ------------------------------------------------------------------------------------------ patches


def random_patch(model: Any, *, seed: int = 0, modules: Sequence[str] = ("gate_proj", "up_proj", "down_proj"),
                 neurons_per_target: int = 8, clusters: int = 2, scale: float = 0.5,
                 layers: Sequence[int] | None = None, scales: bool = False, name: str = "pico-llama") -> Patch:
    """A patch with realistic magnitudes for ``model``, base description and sketches filled in.

    Each cluster's delta has about ``scale`` times the norm of the neuron vectors it is added to
    (NeST-trained row deltas on SmolLM2 were 0.6-0.7x the row norm), so its effect on the logits
    is visible but finite.

    Args:
        layers: layers to patch (default: all).
        scales: also draw a per-neuron scale in [0.5, 1.5].
    """
    from ..fingerprint import attach_sketches
    from ..models.loading import describe_model, torch_neuron_vectors

    rng = np.random.default_rng(seed)
    n_layers = int(model.config.num_hidden_layers)
    targets: list[Target] = []
    for layer in (range(n_layers) if layers is None else layers):
        for mod in modules:
            tname = f"model.layers.{layer}.mlp.{mod}.weight"
            w = model.get_parameter(tname).detach().float().cpu().numpy()  # (out, in)
            axis = MODULE_AXIS[mod]
            n_axis = w.shape[0] if axis == AXIS_ROW else w.shape[1]
            n = min(neurons_per_target, n_axis)
            idx = np.sort(rng.choice(n_axis, size=n, replace=False)).astype(np.int32)
            k = max(1, min(clusters, n))
            cl = rng.permutation(np.arange(n) % k).astype(np.int32)  # every cluster non-empty
            vecs = w[idx, :] if axis == AXIS_ROW else w[:, idx].T  # (n, d)
            d = vecs.shape[1]
            typical = float(np.linalg.norm(vecs, axis=1).mean())
            deltas = (rng.standard_normal((k, d)) * (scale * typical / np.sqrt(d))).astype(np.float32)
            sc = rng.uniform(0.5, 1.5, n).astype(np.float32) if scales else None
            targets.append(Target(name=tname, axis=axis, shape=(int(w.shape[0]), int(w.shape[1])),
                                  indices=idx, clusters=cl, deltas=deltas, scales=sc))
    patch = Patch(targets=targets, base=describe_model(model, name=name),
                  policy={"name": "pico-random", "version": "0", "description": f"random patch, seed {seed}"})
    attach_sketches(patch, lambda t: torch_neuron_vectors(model, t))
    return patch


def apply_patch_torch(model: Any, patch: Patch) -> Any:
    """A deep copy of ``model`` with the patch's dense updates added (the float reference)."""
    import torch

    m = copy.deepcopy(model)
    with torch.no_grad():
        for t in patch.targets:
            p = m.get_parameter(t.name)
            p.add_(torch.from_numpy(t.dense_update()).to(p.dtype))
    return m
