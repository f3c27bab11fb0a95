"""Judge agreement with the committed hand labels: docs/JUDGES.md's table is recomputed from files."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from nestpatch.evaluate.agreement import LABELS, agreement_table, binary_agreement, read_jsonl, render_table
from nestpatch.evaluate.judges import make_judge

ROOT = Path(__file__).resolve().parents[1]
LABELS_FILE = ROOT / "docs" / "labels" / "labels.jsonl"
VERDICTS_FILE = ROOT / "docs" / "labels" / "verdicts.jsonl"


def test_binary_agreement_by_hand():
    # 3 TP, 1 FN, 1 FP, 5 TN, 1 unparsed
    pairs = [(True, True)] * 3 + [(True, False)] + [(False, True)] + [(False, False)] * 5 + [(True, None)]
    d = binary_agreement(pairs)
    assert (d["tp"], d["fn"], d["fp"], d["tn"], d["unparsed"], d["n"]) == (3, 1, 1, 5, 1, 10)
    assert d["accuracy"] == pytest.approx(0.8) and d["fpr"] == pytest.approx(1 / 6) and d["fnr"] == pytest.approx(0.25)
    pe = (4 * 4 + 6 * 6) / 100  # chance agreement from the marginals
    assert d["kappa"] == pytest.approx((0.8 - pe) / (1 - pe))
    assert binary_agreement([])["accuracy"] is None


def test_committed_labels_and_cached_verdicts_reproduce_the_judges_table():
    labels, verdicts = read_jsonl(LABELS_FILE), read_jsonl(VERDICTS_FILE)
    assert len({r["id"] for r in labels}) == len(labels) and all(r["label"] in LABELS for r in labels)
    by_id = {r["id"]: r for r in labels}
    # the cheap judges' cached verdicts are what the judges say today (rules unchanged since labelling)
    for name in ("refusal-phrase", "strict-refusal"):
        j = make_judge(name)
        cached = {v["id"]: v for v in verdicts if v["judge"] == name and v["id"] in by_id}
        assert len(cached) == len(labels)
        for i, v in cached.items():
            assert j.judge(by_id[i]["behaviour"], by_id[i]["reply"]).refused == v["refused"], i
    # composite = harm unsafe AND no refusal phrase, on every item the harm judge saw
    harm = {v["id"]: v for v in verdicts if v["judge"] == "harm"}
    phrase = {v["id"]: v for v in verdicts if v["judge"] == "refusal-phrase"}
    for v in verdicts:
        if v["judge"] == "composite" and harm[v["id"]]["unsafe"] is not None:
            assert v["unsafe"] == (harm[v["id"]]["unsafe"] and not phrase[v["id"]]["refused"])
    table = render_table(agreement_table(labels, verdicts))
    doc = (ROOT / "docs" / "JUDGES.md").read_text(encoding="utf-8")
    m = re.search(r"<!-- agreement:begin -->\n(.*?)\n<!-- agreement:end -->", doc, re.S)
    assert m and m.group(1).strip() == table.strip()
