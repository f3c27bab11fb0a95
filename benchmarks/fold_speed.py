"""GGUF fold speed vs a plain file copy, and peak memory, on a generated multi-GB llama GGUF.

Targets (issue 4): fold time <= 2x the time to copy the same file; peak RSS <= 1 GB whatever the
model size (the fold streams; untouched bytes are copied in the kernel).

The model is written quickly without quantizing billions of values: one random tile of rows is
quantized per tensor shape and repeated (valid blocks of the chosen type). The patch is NeST-
sized (``--neurons`` per target on gate/up/down of every layer), its fingerprint read from the file.
Copy and fold alternate for ``--rounds`` rounds on a warm page cache; medians are reported, with
CPU seconds (on a busy shared machine, wall time follows the CPU share a process gets). Each fold
runs in a fresh subprocess so its peak RSS (ru_maxrss) is its own; a second fold per round runs
without hashing the source (``hash_source=False``) to show what the sha256 costs.

    python benchmarks/fold_speed.py                          # ~3 GB Q4_1 model in a temp dir
    python benchmarks/fold_speed.py --size-gb 1 --qtype Q8_0 --precision keep --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def write_synthetic_gguf(path: Path, *, n_layers: int, d_model: int, n_ff: int, vocab: int, qtype: str, seed: int = 0) -> Path:
    """A llama-architecture GGUF with valid random blocks, streamed to disk tensor by tensor."""
    from gguf import GGUFValueType

    from nestpatch.converters import gguf_codecs as codecs
    from nestpatch.models.gguf_layout import align, encode_kv, encode_tensor_info, header_prefix, tensor_nbytes

    qt = codecs.qtype_of(qtype)
    f32 = codecs.QType.F32
    rng = np.random.default_rng(seed)
    n_kv_heads = max(1, d_model // 128 // 4)
    kv_dim = d_model // (d_model // 128) * n_kv_heads
    tensors: list[tuple[str, tuple[int, ...], object]] = [("token_embd.weight", (d_model, vocab), qt)]
    for i in range(n_layers):
        tensors += [
            (f"blk.{i}.attn_norm.weight", (d_model,), f32),
            (f"blk.{i}.attn_q.weight", (d_model, d_model), qt),
            (f"blk.{i}.attn_k.weight", (d_model, kv_dim), qt),
            (f"blk.{i}.attn_v.weight", (d_model, kv_dim), qt),
            (f"blk.{i}.attn_output.weight", (d_model, d_model), qt),
            (f"blk.{i}.ffn_norm.weight", (d_model,), f32),
            (f"blk.{i}.ffn_gate.weight", (d_model, n_ff), qt),
            (f"blk.{i}.ffn_up.weight", (d_model, n_ff), qt),
            (f"blk.{i}.ffn_down.weight", (n_ff, d_model), qt),
        ]
    tensors.append(("output_norm.weight", (d_model,), f32))
    kv = [("general.architecture", "llama", GGUFValueType.STRING), ("general.name", "synthetic", GGUFValueType.STRING)]
    for k, v in {"block_count": n_layers, "embedding_length": d_model, "feed_forward_length": n_ff, "context_length": 4096,
                 "attention.head_count": d_model // 128, "attention.head_count_kv": n_kv_heads, "vocab_size": vocab}.items():
        kv.append((f"llama.{k}", v, GGUFValueType.UINT32))
    infos, off = [], 0
    for name, ne, t in tensors:
        infos.append(encode_tensor_info(name, ne, t, off))
        off = align(off + tensor_nbytes(ne, t), 32)
    header = header_prefix(3, len(tensors), len(kv)) + b"".join(encode_kv(k, v, t) for k, v, t in kv) + b"".join(infos)
    tiles: dict[tuple, np.ndarray] = {}
    with open(path, "wb") as f:
        f.write(header)
        f.write(bytes(align(len(header), 32) - len(header)))
        for _name, ne, t in tensors:
            n, rows = ne[0], int(np.prod(ne[1:])) if len(ne) > 1 else 1
            key = (n, t)
            if key not in tiles:
                tile = (rng.standard_normal((min(rows, 64), n)) * 0.02).astype(np.float32)
                tiles[key] = codecs.quantize_rows(tile, t) if t != f32 else tile.view(np.uint8)
            tile = tiles[key]
            left = rows
            while left > 0:
                k = min(left, tile.shape[0])
                f.write(tile[:k].tobytes())
                left -= k
            size = tensor_nbytes(ne, t)
            f.write(bytes(align(size, 32) - size))
    return path


_FOLD_CHILD = """
import json, resource, sys, time
from nestpatch.format import read_patch
from nestpatch.converters.gguf_fold import fold_gguf
t = time.perf_counter()
rep = fold_gguf(sys.argv[1], read_patch(sys.argv[2]), sys.argv[3], precision=sys.argv[4], progress=False,
                hash_source=sys.argv[5] == "1")
dt = time.perf_counter() - t
ru = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"seconds": dt, "maxrss_kb": ru.ru_maxrss, "cpu_s": ru.ru_utime + ru.ru_stime,
                  "bytes_out": rep.bytes_out, "min_retention": rep.min_retention,
                  "types_out": sorted({x.type_out for x in rep.targets})}))
"""


def _drop(path: Path) -> None:
    if path.exists():
        path.unlink()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=3.0, help="approximate model size to generate")
    ap.add_argument("--qtype", default="Q4_1", help="type of the weight matrices (Q4_1, Q8_0, Q4_0, ...)")
    ap.add_argument("--d-model", type=int, default=4096)
    ap.add_argument("--n-ff", type=int, default=14336)
    ap.add_argument("--neurons", type=int, default=48, help="patched neurons per target (gate/up/down of every layer)")
    ap.add_argument("--precision", default="keep", help="fold precision (keep, auto, q8_0, f16)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=None, help="where to put the generated files (default: a temp dir)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    args = ap.parse_args()

    from nestpatch.converters import gguf_codecs as codecs
    from nestpatch.format import write_patch
    from nestpatch.testing import random_patch_gguf

    qt = codecs.qtype_of(args.qtype)
    bpw = codecs.type_size(qt) / codecs.block_size(qt)
    d, ff, vocab = args.d_model, args.n_ff, 32000
    per_layer = (2 * d * d + 2 * d * (d // 4) + 3 * d * ff) * bpw
    n_layers = max(1, round((args.size_gb * 1e9 - vocab * d * bpw) / per_layer))

    work = Path(tempfile.mkdtemp(prefix="nestpatch-foldbench-", dir=args.workdir))
    try:
        model = work / "model.gguf"
        t = time.perf_counter()
        write_synthetic_gguf(model, n_layers=n_layers, d_model=d, n_ff=ff, vocab=vocab, qtype=args.qtype)
        size = model.stat().st_size
        print(f"generated {model.name}: {size / 1e9:.2f} GB, {n_layers} layers, d_model {d}, n_ff {ff}, {args.qtype} "
              f"({time.perf_counter() - t:.1f} s)")
        t = time.perf_counter()
        patch = random_patch_gguf(model, neurons_per_target=args.neurons, clusters=2, scale=0.6)
        patch_path = write_patch(patch, work / "p.nestpatch")
        print(f"patch: {len(patch.targets)} targets, {patch.n_neurons} neurons ({time.perf_counter() - t:.1f} s)")

        with open(model, "rb") as f:  # warm the page cache so copy and fold read alike
            while f.read(64 << 20):
                pass
        copies, folds, rss, last, copy_cpu, fold_cpu, folds_nohash = [], [], [], {}, [], [], []
        for r in range(args.rounds):
            dst = work / "copy.gguf"
            r0 = resource.getrusage(resource.RUSAGE_SELF)
            t = time.perf_counter()
            shutil.copyfile(model, dst)
            copies.append(time.perf_counter() - t)
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            copy_cpu.append(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime)
            _drop(dst)
            out = work / "folded.gguf"
            for hashed in (True, False):
                proc = subprocess.run([sys.executable, "-c", _FOLD_CHILD, str(model), str(patch_path), str(out),
                                       args.precision, "1" if hashed else "0"], capture_output=True, text=True, check=True)
                res_r = json.loads(proc.stdout.strip().splitlines()[-1])
                _drop(out)
                if hashed:
                    last = res_r
                    folds.append(res_r["seconds"])
                    rss.append(res_r["maxrss_kb"] / 1024)
                    fold_cpu.append(res_r["cpu_s"])
                else:
                    folds_nohash.append(res_r["seconds"])
            print(f"round {r + 1}: copy {copies[-1]:.2f} s (cpu {copy_cpu[-1]:.2f} s), fold {folds[-1]:.2f} s "
                  f"(cpu {fold_cpu[-1]:.2f} s, imports included; without the source sha256 {folds_nohash[-1]:.2f} s), "
                  f"fold peak RSS {rss[-1]:.0f} MB", flush=True)
        res = {
            "model_bytes": size, "qtype": args.qtype, "n_layers": n_layers, "d_model": d, "n_ff": ff,
            "targets": len(patch.targets), "neurons": patch.n_neurons, "precision": args.precision,
            "copy_s_median": statistics.median(copies), "fold_s_median": statistics.median(folds),
            "fold_over_copy": statistics.median(folds) / statistics.median(copies),
            "fold_nohash_s_median": statistics.median(folds_nohash),
            "fold_nohash_over_copy": statistics.median(folds_nohash) / statistics.median(copies),
            "copy_cpu_s_median": statistics.median(copy_cpu), "fold_cpu_s_median": statistics.median(fold_cpu),
            "load_avg_1m_at_end": os.getloadavg()[0],
            "fold_peak_rss_mb": max(rss), "bytes_out": last.get("bytes_out"), "min_retention": last.get("min_retention"),
            "types_out": last.get("types_out"), "rounds": args.rounds, "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "bench_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
        print(f"without hashing the source: fold/copy = {res['fold_nohash_over_copy']:.2f}x")
        print(f"fold/copy = {res['fold_over_copy']:.2f}x (median fold {res['fold_s_median']:.2f} s, copy "
              f"{res['copy_s_median']:.2f} s; target <= 2x); fold peak RSS {res['fold_peak_rss_mb']:.0f} MB (target <= 1024 MB); "
              f"output {res['bytes_out'] / 1e9:.3f} GB vs input {size / 1e9:.3f} GB; min retention {res['min_retention']:.3f}")
        if args.json:
            args.json.write_text(json.dumps(res, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
