"""Seeded fuzzing of `.nestpatch` inputs through the real CLI, in process (click's CliRunner).

Each case mutates a seed file (a spec vector or a pico patch): bit flips, truncations, header
and metadata edits (schema violations, duplicate keys, NaN/Infinity, alias target names, huge
sizes, bad versions), tensor edits re-digested so they reach the semantic checks, and benign
metadata edits that a reader must accept. Every case runs ``validate`` and ``inspect --json``;
every file ``validate`` accepts also runs inspect, inspect --json, diff, apply + verify on a pico
GGUF, export-lora (both formats), sign and report. A result is good when it exits 0 (1 for diff
and verify), or 2 with exactly one ``error:`` line; anything else (a traceback) is a failure, and
so is any change to the input file's bytes.

Used by ``tests/test_fuzz_cli.py`` (a CI subset) and ``scripts/fuzz.py`` (>= 5,000 cases).
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
import resource
import shutil
import struct
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..format.digest import content_digest
from ..format.safetensors_io import decode_array, dumps, encode_array

#: Exit codes a command may end with (diff and verify use 1 for "different" / "failed").
ALLOWED = {"validate": {0, 2}, "inspect": {0, 2}, "inspect-json": {0, 2}, "diff": {0, 1, 2}, "apply": {0, 2},
           "verify": {0, 1, 2}, "export-gguf": {0, 2}, "export-peft": {0, 2}, "sign": {0, 2}, "report": {0, 2}}

_POOL: list[Any] = [None, True, -1, 0, 1, 2 ** 31, 2 ** 63, 1 << 26, 1.5, -0.0, 1e308, "", "x", "1.0",
                    "\x1b[2J\x1b[H", "a\nb", "\u202e", [], [1, 2], {}, {"a": 1}, "row", "col", "F16", "BF16", "I32"]


@dataclass
class FuzzStats:
    fuzzed: int = 0
    accepted: int = 0
    tracebacks: int = 0
    modified: int = 0
    bad_errors: int = 0
    runs: int = 0
    failures: list[str] = field(default_factory=list)
    kinds: dict[str, int] = field(default_factory=dict)
    peak_rss_mb: float = 0.0

    def summary(self) -> str:
        return (f"fuzzed {self.fuzzed}, accepted {self.accepted}, command runs {self.runs}, tracebacks {self.tracebacks}, "
                f"inputs modified {self.modified}, malformed errors {self.bad_errors}, peak RSS {self.peak_rss_mb:.0f} MB")


# --------------------------------------------------------------------------- container helpers


def split(data: bytes) -> tuple[dict, bytes] | None:
    """(header dict, data section) of a well-formed container, else None."""
    if len(data) < 8:
        return None
    (hlen,) = struct.unpack("<Q", data[:8])
    try:
        header = json.loads(data[8:8 + hlen])
    except (ValueError, RecursionError):
        return None
    return (header, data[8 + hlen:]) if isinstance(header, dict) else None


def join(header: dict | str, body: bytes) -> bytes:
    hb = (header if isinstance(header, str) else json.dumps(header, separators=(",", ":"))).encode("utf-8", "surrogatepass")
    hb += b" " * ((8 - len(hb) % 8) % 8)
    return struct.pack("<Q", len(hb)) + hb + body


def decode_tensors(header: dict, body: bytes) -> dict[str, tuple[str, np.ndarray]]:
    out = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        s, t = e["data_offsets"]
        arr = decode_array(body[s:t], e["dtype"], tuple(e["shape"]))
        out[name] = (e["dtype"], np.array(arr))
    return out


def serialize_raw(tensors: dict[str, tuple[str, np.ndarray]], doc: dict, version: str = "1.0") -> bytes:
    """A container with a correct digest but no validation: reaches the reader's semantic checks."""
    items = [(n, dt, tuple(np.shape(a)), encode_array(a, dt)) for n, (dt, a) in sorted(tensors.items())]
    doc = dict(doc)
    doc["content_digest"] = content_digest(items)
    meta = {"format": "nestpatch", "nestpatch.version": version, "nestpatch.metadata": json.dumps(doc, allow_nan=True)}
    return dumps(tensors, meta)


# --------------------------------------------------------------------------- mutations


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, prefix + (i,))
    return out


def _get(obj: Any, path: tuple) -> Any:
    for k in path:
        obj = obj[k]
    return obj


def _doc_of(data: bytes) -> tuple[dict, bytes, dict] | None:
    sp = split(data)
    if sp is None:
        return None
    header, body = sp
    try:
        doc = json.loads(header["__metadata__"]["nestpatch.metadata"])
    except (KeyError, TypeError, ValueError, RecursionError):
        return None
    if not isinstance(doc, dict):
        return None
    return header, body, doc


def _with_doc_text(header: dict, body: bytes, text: str) -> bytes:
    header = copy.deepcopy(header)
    header["__metadata__"]["nestpatch.metadata"] = text
    return join(header, body)


def m_bitflip(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(len(b))
        b[i] ^= 1 << rng.randrange(8)
    return bytes(b)


def m_header_bitflip(rng: random.Random, data: bytes) -> bytes:
    (hlen,) = struct.unpack("<Q", data[:8])
    b = bytearray(data)
    i = rng.randrange(8, 8 + max(1, min(hlen, len(b) - 8)))
    b[i] ^= 1 << rng.randrange(8)
    return bytes(b)


def m_truncate(rng: random.Random, data: bytes) -> bytes:
    return data[: rng.randrange(len(data))]


def m_length_prefix(rng: random.Random, data: bytes) -> bytes:
    return struct.pack("<Q", rng.choice([0, 1, 7, len(data), 1 << 26, 1 << 40, 2 ** 64 - 1])) + data[8:]


def m_meta_value(rng: random.Random, data: bytes) -> bytes:
    parsed = _doc_of(data)
    if parsed is None:
        return m_bitflip(rng, data)
    header, body, doc = parsed
    path = rng.choice(_paths(doc)[1:])
    parent = _get(doc, path[:-1])
    parent[path[-1]] = copy.deepcopy(rng.choice(_POOL))
    return _with_doc_text(header, body, json.dumps(doc))


def m_meta_delete(rng: random.Random, data: bytes) -> bytes:
    parsed = _doc_of(data)
    if parsed is None:
        return m_truncate(rng, data)
    header, body, doc = parsed
    paths = [p for p in _paths(doc)[1:] if isinstance(_get(doc, p[:-1]), dict)]
    path = rng.choice(paths)
    del _get(doc, path[:-1])[path[-1]]
    return _with_doc_text(header, body, json.dumps(doc))


def m_meta_text(rng: random.Random, data: bytes) -> bytes:
    """Textual edits JSON libraries would hide: duplicate keys, NaN/Infinity, deep nesting."""
    parsed = _doc_of(data)
    if parsed is None:
        return m_bitflip(rng, data)
    header, body, doc = parsed
    text = json.dumps(doc)
    key = rng.choice(['"policy":', '"base":', '"targets":', '"content_digest":', '"signature":', '"tolerance":', '"name":'])
    choice = rng.randrange(5)
    if choice == 0 and key in text:
        text = text.replace(key, key + ' {"dup": 1}, ' + key, 1)
    elif choice == 1:
        text = text.replace("0.35", rng.choice(["NaN", "Infinity", "-Infinity", "1e999"]), 1)
    elif choice == 2:
        text = text[:-1] + ', "evaluation": {"deep": ' + "[" * rng.choice([50, 5000]) + "]" * 3 + "}}"
    elif choice == 3:
        text = text[:-1] + ', "zz_unknown": {"x": [1, 2, "\\u0000"]}}'  # unknown keys: must be accepted
    else:
        text = text.replace('"targets": [', '"targets": [' + rng.choice(["1,", "null,", "{},", '{"name": "x"},']), 1)
    return _with_doc_text(header, body, text)


def m_version(rng: random.Random, data: bytes) -> bytes:
    sp = split(data)
    if sp is None:
        return m_bitflip(rng, data)
    header, body = sp
    header = copy.deepcopy(header)
    header.setdefault("__metadata__", {})["nestpatch.version"] = rng.choice(
        ["1", "1.0.0", "01.0", "1.x", "2.0", "0.9", "1.7", " 1.0", "1.0\n", "", "١.٠"])
    return join(header, body)


def m_tensor_entry(rng: random.Random, data: bytes) -> bytes:
    sp = split(data)
    if sp is None:
        return m_bitflip(rng, data)
    header, body = sp
    header = copy.deepcopy(header)
    names = [n for n in header if n != "__metadata__"]
    if not names:
        return data
    e = header[rng.choice(names)]
    what = rng.randrange(4)
    if what == 0:
        e["dtype"] = rng.choice(["F32", "F16", "BF16", "I32", "I64", "U8", "F64", "x"])
    elif what == 1:
        e["shape"] = rng.choice([[], [0], [1 << 24, 1 << 24], [-1], [2, 2, 2, 2, 2], [1.5], [e["shape"][0] if e["shape"] else 1]])
    elif what == 2:
        s, t = e["data_offsets"]
        e["data_offsets"] = rng.choice([[t, s], [s, t + 4], [s - 4, t - 4], [0, 0], [s, 2 ** 63]])
    else:
        header[rng.choice(names) + "x"] = e
    return join(header, body)


def _raw_parts(data: bytes) -> tuple[dict[str, tuple[str, np.ndarray]], dict, str] | None:
    parsed = _doc_of(data)
    if parsed is None:
        return None
    header, body, doc = parsed
    try:
        return decode_tensors(header, body), doc, header["__metadata__"].get("nestpatch.version", "1.0")
    except (KeyError, ValueError, TypeError):
        return None


def m_redigest(rng: random.Random, data: bytes) -> bytes:
    """Change tensor values, keep the digest right: only the semantic checks can refuse it."""
    parts = _raw_parts(data)
    if parts is None:
        return m_bitflip(rng, data)
    tensors, doc, version = parts
    name = rng.choice(sorted(tensors))
    dt, arr = tensors[name]
    arr = np.array(arr, dtype=np.float32 if dt in ("F32", "F16", "BF16") else np.int64)
    flat = arr.reshape(-1)
    what = rng.randrange(6)
    if flat.size and what == 0:
        flat[rng.randrange(flat.size)] = rng.choice([np.nan, np.inf, -np.inf]) if dt != "I32" else rng.choice([-1, 2 ** 30])
    elif flat.size and what == 1:
        flat[:] = flat[::-1].copy()
    elif what == 2:
        arr = arr[:-1] if arr.shape and arr.shape[0] > 1 else arr
    elif what == 3:
        tensors[name.rsplit("/", 1)[0] + "/" + rng.choice(["scales", "base_sketch", "extra"])] = (
            rng.choice(["F32", "F16", "I32"]), np.ones(rng.choice([(1,), (3,), (8,), (8, 9), (8, 1)]), np.float32))
    elif what == 4:
        del tensors[name]
    else:
        arr = arr * 1e30 if dt != "I32" else arr
    if what not in (3, 4):
        tensors[name] = (dt, arr.astype(np.int32) if dt == "I32" else arr.astype(np.float32))
    return serialize_raw(tensors, doc, version)


def m_alias(rng: random.Random, data: bytes) -> bytes:
    """Add a target whose name is another spelling of an existing one (same weight twice)."""
    parts = _raw_parts(data)
    if parts is None:
        return m_bitflip(rng, data)
    tensors, doc, version = parts
    if not doc.get("targets"):
        return data
    t = copy.deepcopy(rng.choice(doc["targets"]))
    old = t["name"]
    new = rng.choice([old.removeprefix("model."), "model.language_model." + old.removeprefix("model."),
                      old.replace("layers.", "layers.0", 1), old.upper(), old + " ", old.replace("up_proj", "down_proj")])
    if new == old:
        new = "model." + old
    t["name"] = new
    doc["targets"].append(t)
    for n in list(tensors):
        if n.startswith(old + "/"):
            tensors[new + n[len(old):]] = tensors[n]
    return serialize_raw(tensors, doc, version)


def m_huge(rng: random.Random, data: bytes) -> bytes:
    """Numbers that would size an allocation: sketch size, shapes, cluster counts, tolerance."""
    parts = _raw_parts(data)
    if parts is None:
        return m_length_prefix(rng, data)
    tensors, doc, version = parts
    big = rng.choice([1 << 22, 1 << 24, 1 << 26, 2 ** 31, 2 ** 62])
    what = rng.randrange(4)
    if what == 0:
        doc.setdefault("base", {}).setdefault("fingerprint", {"method": "rademacher-sketch-v1", "tolerance": 0.35})["size"] = big
    elif what == 1 and doc.get("targets"):
        t = rng.choice(doc["targets"])
        i = rng.randrange(2)
        t["shape"][i] = big
    elif what == 2 and doc.get("targets"):
        rng.choice(doc["targets"])["n_clusters"] = big
    else:
        doc.setdefault("base", {}).setdefault("fingerprint", {"method": "rademacher-sketch-v1", "size": 8})["tolerance"] = \
            rng.choice([1e9, 1e308, 0.36, 5e-324])
    return serialize_raw(tensors, doc, version)


def m_benign(rng: random.Random, data: bytes) -> bytes:
    """Edits a reader must accept: free text (with control characters), evaluation, unknown keys."""
    parts = _raw_parts(data)
    if parts is None:
        return data
    tensors, doc, version = parts
    text = "".join(rng.choice(["a", "é", "\x1b[31m", "\n", "\r", "\t", "\u202e", "€", " ", "<b>", "\\", '"'])
                   for _ in range(rng.randint(0, 40)))
    what = rng.randrange(4)
    if what == 0:
        doc.setdefault("policy", {})["description"] = text
    elif what == 1:
        doc["evaluation"] = {"note": text, "asr": rng.random(), "nested": {"k": [1, 2.5, None, text]}}
    elif what == 2:
        doc.setdefault("policy", {})["name"] = text
        doc.setdefault("base", {})["name"] = text
    else:
        doc["zz_" + text[:8]] = {"x": text}
        doc.setdefault("provenance", {})["tool"] = text
    return serialize_raw(tensors, doc, version)


MUTATIONS: dict[str, tuple[Callable[[random.Random, bytes], bytes], int]] = {
    "bitflip": (m_bitflip, 12), "header_bitflip": (m_header_bitflip, 10), "truncate": (m_truncate, 8),
    "length_prefix": (m_length_prefix, 3), "meta_value": (m_meta_value, 16), "meta_delete": (m_meta_delete, 8),
    "meta_text": (m_meta_text, 8), "version": (m_version, 4), "tensor_entry": (m_tensor_entry, 8),
    "redigest": (m_redigest, 10), "alias": (m_alias, 5), "huge": (m_huge, 6), "benign": (m_benign, 4),
}


def mutate(rng: random.Random, data: bytes) -> tuple[str, bytes]:
    names = list(MUTATIONS)
    kind = rng.choices(names, weights=[MUTATIONS[n][1] for n in names])[0]
    out = MUTATIONS[kind][0](rng, data)
    if rng.random() < 0.15 and len(out) >= 8:  # a second mutation now and then
        kind2 = rng.choices(names, weights=[MUTATIONS[n][1] for n in names])[0]
        try:
            out = MUTATIONS[kind2][0](rng, out)
            kind = f"{kind}+{kind2}"
        except (ValueError, KeyError, TypeError, IndexError, AttributeError, RecursionError, struct.error):
            pass  # the first mutation left something the second cannot parse: keep the first
    return kind, out


# --------------------------------------------------------------------------- running


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


class Fuzzer:
    """Runs cases in ``workdir`` against a pico GGUF model; collects :class:`FuzzStats`."""

    def __init__(self, workdir: Path, model: Path, reference_patch: Path, seeds: list[Path], *, chain_limit: int | None = None):
        from click.testing import CliRunner

        from ..cli import cli

        self.cli = cli
        self.runner = CliRunner()
        self.work = Path(workdir)
        self.model = Path(model)
        self.reference = Path(reference_patch)
        self.seeds = [(p.name, p.read_bytes()) for p in seeds]
        self.chain_limit = chain_limit
        self.stats = FuzzStats()
        self.key = self.work / "fuzz.key"
        if not self.key.exists():
            res = self.runner.invoke(cli, ["keygen", "-o", str(self.key)], obj={})
            assert res.exit_code == 0, res.output

    def _invoke(self, label: str, case: str, args: list[str], patch: Path) -> int:
        res = self.runner.invoke(self.cli, [str(a) for a in args], obj={})
        self.stats.runs += 1
        exc = res.exception
        if exc is not None and not isinstance(exc, SystemExit):
            self.stats.tracebacks += 1
            tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-1500:]
            self.stats.failures.append(f"[{case}] {label}: {type(exc).__name__}: {exc}\n{tb}")
            return -1
        if res.exit_code not in ALLOWED[label]:
            self.stats.bad_errors += 1
            self.stats.failures.append(f"[{case}] {label}: exit {res.exit_code}: {res.output[-300:]}")
        elif res.exit_code == 2:
            lines = res.stderr.strip().splitlines()
            if len(lines) != 1 or not lines[0].startswith("error: "):
                self.stats.bad_errors += 1
                self.stats.failures.append(f"[{case}] {label}: not one error line: {res.stderr[-300:]!r}")
            elif label in ("validate", "inspect", "inspect-json") and patch.name not in lines[0]:
                self.stats.bad_errors += 1
                self.stats.failures.append(f"[{case}] {label}: error does not name the file: {lines[0][:200]}")
        return res.exit_code

    def run_case(self, index: int, rng: random.Random) -> None:
        seed_name, seed = rng.choice(self.seeds)
        try:
            kind, data = mutate(rng, seed)
        except Exception:  # noqa: BLE001 - a harness bug must not end a long run; the case is the seed itself
            kind, data = "seed", seed
        case = f"{index}:{seed_name}:{kind}"
        self.stats.fuzzed += 1
        self.stats.kinds[kind.split("+")[0]] = self.stats.kinds.get(kind.split("+")[0], 0) + 1
        d = self.work / f"case{index % 2}"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
        patch = d / "case.nestpatch"
        patch.write_bytes(data)
        before = _sha(patch)
        model_before = None
        ok = self._invoke("validate", case, ["validate", patch], patch) == 0
        self._invoke("inspect-json", case, ["inspect", "--json", patch], patch)
        if ok:
            self.stats.accepted += 1
            if self.chain_limit is None or self.stats.accepted <= self.chain_limit:
                model_before = model_before or _sha(self.model)
                self._chain(case, d, patch)
                if _sha(self.model) != model_before:
                    self.stats.modified += 1
                    self.stats.failures.append(f"[{case}] the model file changed")
        if _sha(patch) != before:
            self.stats.modified += 1
            self.stats.failures.append(f"[{case}] the input patch changed")
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        self.stats.peak_rss_mb = max(self.stats.peak_rss_mb, rss)

    def _chain(self, case: str, d: Path, patch: Path) -> None:
        inv = self._invoke
        inv("inspect", case, ["inspect", patch], patch)
        inv("diff", case, ["diff", self.reference, patch], patch)
        inv("diff", case, ["diff", patch, patch, "--json"], patch)
        out = d / "folded.gguf"
        if inv("apply", case, ["apply", self.model, patch, "-o", out, "--report-json", d / "fold.json"], patch) == 0:
            inv("verify", case, ["verify", out, "--patch", patch], patch)
            inv("verify", case, ["verify", out, "--patch", patch, "--base", self.model], patch)
        inv("apply", case, ["apply", self.model, patch, "-o", d / "skip.gguf", "--skip-base-check"], patch)
        inv("export-gguf", case, ["export-lora", patch, "--format", "gguf", "-o", d / "a.gguf"], patch)
        inv("export-peft", case, ["export-lora", patch, "--format", "peft", "-o", d / "peft"], patch)
        inv("sign", case, ["sign", patch, "--key", self.key, "-o", d / "signed.nestpatch"], patch)
        folds = ["--fold-report", d / "fold.json"] if (d / "fold.json").exists() else []
        inv("report", case, ["report", patch, "-o", d / "r.html", *folds], patch)

    def run(self, n: int, seed: int) -> FuzzStats:
        rng = random.Random(seed)
        for i in range(n):
            self.run_case(i, rng)
        return self.stats


def seed_files(root: Path) -> list[Path]:
    """The spec's valid vectors (the pico patch is added by the caller)."""
    return sorted((root / "spec" / "vectors").glob("*.nestpatch"))


def build_pico(workdir: Path, seed: int = 0) -> tuple[Path, Path]:
    """A pico GGUF model (F32) and a random patch for it (with sketches), written to ``workdir``."""
    from ..format import write_patch
    from . import make_pico_model, random_patch, write_gguf

    model = make_pico_model(seed=seed)
    gguf = write_gguf(model, Path(workdir) / "pico.gguf", qtype="F32")
    patch = write_patch(random_patch(model, seed=seed, neurons_per_target=4, layers=[0]), Path(workdir) / "pico.nestpatch")
    scaled = write_patch(random_patch(model, seed=seed + 1, neurons_per_target=3, layers=[1], scales=True,
                                      modules=("up_proj", "down_proj")), Path(workdir) / "pico_scaled.nestpatch")
    del scaled
    return gguf, patch
