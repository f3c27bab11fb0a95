"""``nestpatch report``: one self-contained HTML file, checked in a real headless Chromium.

The browser is driven through the DevTools protocol over ``--remote-debugging-pipe`` (fds 3 and
4, NUL-separated JSON), so no websocket library is needed. The check: no console errors or
exceptions, no request leaves the file (no network), and every figure decodes and has a size
on the page. A control page with a broken image, a console error and a remote image proves the
harness does see such problems.
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from nestpatch.cli import cli
from nestpatch.format import write_patch

CHROMIUM = "/usr/bin/chromium"
INSTALL = "apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--remote-debugging-pipe"]


def _find_or_install_chromium() -> str | None:
    path = shutil.which("chromium") or (CHROMIUM if os.path.exists(CHROMIUM) else None)
    if path:
        return path
    if shutil.which("apt-get") is None:
        return None
    cmd = ["bash", "-c", INSTALL]
    if os.geteuid() != 0:
        if shutil.which("sudo") is None:
            return None
        cmd = ["sudo", "-n"] + cmd
    try:
        subprocess.run(cmd, check=True, timeout=900, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError):
        return None
    return shutil.which("chromium") or (CHROMIUM if os.path.exists(CHROMIUM) else None)


@pytest.fixture(scope="module")
def chromium() -> str:
    path = _find_or_install_chromium()
    if path is None:
        pytest.skip(f"Debian's chromium is not installed and could not be installed (run as root: {INSTALL})")
    return path


class Browser:
    """A headless Chromium driven over the DevTools pipe."""

    def __init__(self, binary: str, timeout: float = 60.0) -> None:
        self.timeout = timeout
        self._profile = tempfile.TemporaryDirectory(prefix="nestpatch-chromium-")
        to_r, self._to = os.pipe()
        self._from, from_w = os.pipe()

        def child_fds() -> None:  # chromium reads commands on fd 3 and answers on fd 4
            a, b = os.dup(to_r), os.dup(from_w)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen([binary, *FLAGS, f"--user-data-dir={self._profile.name}", "about:blank"],
                                     preexec_fn=child_fds, close_fds=False,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_r)
        os.close(from_w)
        self._buf = b""
        self._id = 0
        self.events: list[dict] = []

    def _next(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("chromium did not answer in time")
            ready, _, _ = select.select([self._from], [], [], left)
            if ready:
                chunk = os.read(self._from, 1 << 16)
                if not chunk:
                    raise RuntimeError(f"chromium closed the DevTools pipe (exit code {self.proc.poll()})")
                self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            m = self._next(deadline)
            if m.get("id") == self._id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)

    def wait_for(self, method: str) -> dict:
        for e in self.events:
            if e.get("method") == method:
                return e
        deadline = time.monotonic() + self.timeout
        while True:
            m = self._next(deadline)
            self.events.append(m)
            if m.get("method") == method:
                return m

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to)
        os.close(self._from)
        self._profile.cleanup()


_IMAGES_JS = """JSON.stringify(Array.from(document.images).map(i => ({
  alt: i.alt, complete: i.complete, naturalWidth: i.naturalWidth, naturalHeight: i.naturalHeight,
  shownWidth: i.getBoundingClientRect().width, src: i.src.slice(0, 22)})))"""


def load_page(binary: str, html: Path) -> dict:
    """Open ``html`` in Chromium; return its problems (console, exceptions, network), images and a screenshot."""
    b = Browser(binary)
    try:
        target = b.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        s = b.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Runtime", "Log", "Network", "Page"):
            b.send(f"{domain}.enable", session=s)
        b.send("Page.navigate", {"url": html.resolve().as_uri()}, session=s)
        b.wait_for("Page.loadEventFired")
        images = json.loads(b.send("Runtime.evaluate", {"expression": _IMAGES_JS, "returnByValue": True}, session=s)["result"]["value"])
        title = b.send("Runtime.evaluate", {"expression": "document.title", "returnByValue": True}, session=s)["result"]["value"]
        shot = base64.b64decode(b.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}, session=s)["data"])
        problems = []
        for e in b.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                problems.append(("console", " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", []))))
            elif m == "Runtime.exceptionThrown":
                problems.append(("exception", p.get("exceptionDetails", {}).get("text", "")))
            elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                problems.append(("log", p["entry"].get("text", "")))
            elif m == "Network.requestWillBeSent":
                url = p.get("request", {}).get("url", "")
                if not url.startswith(("file:", "data:", "about:")):
                    problems.append(("network", url))
        return {"problems": problems, "images": images, "title": title, "screenshot": shot}
    finally:
        b.close()


@pytest.fixture(scope="module")
def report_inputs(tmp_path_factory: pytest.TempPathFactory, pico_patch: Any, pico_hf_dir: Path,
                  pico_gguf: Any) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("report")
    p = pico_patch.copy()
    p.provenance = {
        "tool": "nestpatch", "tool_version": "0.1.0", "created": "2026-11-23T00:00:00Z", "seed": 7,
        "data": [{"role": "harmful", "source": "builtin:harmful-mini", "rows": 40, "sha256": "ab" * 32}],
        "config": {"lr": 0.001, "cluster": {"k_max": 4}}, "libraries": {"torch": "2.13.0", "numpy": "2.4.0"},
        "trainable_parameters": p.trainable_parameters,
    }
    p.policy = {"name": "pico-policy", "version": "1.2", "description": "a <b>policy</b> & its \"escapes\""}
    path = write_patch(p, d / "policy.nestpatch")
    # a real fold report (what `nestpatch apply --report-json` writes)
    from nestpatch.converters.gguf_fold import fold_gguf

    fold = d / "fold.json"
    fold.write_text(fold_gguf(pico_gguf("Q4_1"), p, d / "folded.gguf", progress=False).to_json())
    # a real evaluation run (base and patched, a few prompts): the report reads its summary.json
    from nestpatch.evaluate.runner import run_suites

    run = d / "run1"
    run_suites(pico_hf_dir, path, ["harmbench", "benign", "overrefusal"], out_dir=run, limit=2, compare=True,
               max_new_tokens=4, device="cpu", progress=False)
    return {"patch": path, "fold": fold, "run": run, "dir": d}


def test_report_files(report_inputs: dict[str, Path]) -> None:
    out = report_inputs["dir"] / "report.html"
    r = CliRunner().invoke(cli, ["report", str(report_inputs["patch"]), "-o", str(out),
                                 "--fold-report", str(report_inputs["fold"]), "--eval", str(report_inputs["run"])])
    assert r.exit_code == 0, r.output
    html = out.read_text()
    for name in ("neurons", "clusters", "delta_norms", "retention", "eval"):
        png = out.with_name(f"report-{name}.png")
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert base64.b64encode(png.read_bytes()).decode() in html  # the same picture, embedded
    assert html.count('<img src="data:image/png;base64,') == 5
    assert "http://" not in html and "https://" not in html and "<script" not in html
    assert "a &lt;b&gt;policy&lt;/b&gt; &amp; its &quot;escapes&quot;" in html  # metadata is escaped
    assert "builtin:harmful-mini" in html and "config.cluster.k_max" in html
    data = json.loads(out.with_name("report.json").read_text())
    assert data["totals"]["neurons"] == sum(t["neurons"] for t in data["targets"])
    summary = json.loads((report_inputs["run"] / "summary.json").read_text())
    assert {(e["suite"], e["metric"], e["before"], e["after"], e["n"]) for e in data["evaluation"]} == {
        ("harmbench", "asr", summary["suites"]["harmbench"]["base"]["asr"], summary["suites"]["harmbench"]["patched"]["asr"], 2),
        ("benign", "benign_refusal", summary["suites"]["benign"]["base"]["benign_refusal"],
         summary["suites"]["benign"]["patched"]["benign_refusal"], 2),
        ("overrefusal", "over_refusal", summary["suites"]["overrefusal"]["base"]["over_refusal"],
         summary["suites"]["overrefusal"]["patched"]["over_refusal"], 2)}
    assert all(e["judge"] == "refusal-phrase" for e in data["evaluation"])
    fold = json.loads(report_inputs["fold"].read_text())
    assert [(t["name"], t["retention"]) for t in data["folds"][0]["targets"]] == [(t["name"], t["retention"]) for t in fold["targets"]]
    assert data["folds"][0]["label"] == "gguf: folded.gguf"
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]


def test_report_in_headless_chromium(chromium: str, report_inputs: dict[str, Path]) -> None:
    out = report_inputs["dir"] / "browser.html"
    r = CliRunner().invoke(cli, ["report", str(report_inputs["patch"]), "-o", str(out),
                                 "--fold-report", str(report_inputs["fold"]), "--eval", str(report_inputs["run"])])
    assert r.exit_code == 0, r.output
    page = load_page(chromium, out)
    assert page["problems"] == []
    assert page["title"] == "nestpatch report: pico-policy 1.2"
    imgs = page["images"]
    assert len(imgs) == 5
    for img in imgs:
        assert img["complete"] and img["naturalWidth"] > 100 and img["naturalHeight"] > 100, img
        assert img["shownWidth"] > 100 and img["src"] == "data:image/png;base64,", img
    assert len(page["screenshot"]) > 50_000  # a full page of figures, not a blank one


def test_harness_sees_problems(chromium: str, tmp_path: Path) -> None:
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><head><title>bad</title></head><body>'
                   '<img src="data:image/png;base64,AAAA" alt="broken">'
                   '<img src="http://127.0.0.1:9/remote.png" alt="remote">'
                   '<script>console.error("boom")</script></body></html>')
    page = load_page(chromium, bad)
    kinds = {k for k, _ in page["problems"]}
    assert "console" in kinds and "network" in kinds
    assert any(not i["naturalWidth"] for i in page["images"])


def test_report_without_optional_inputs(tmp_path: Path, pico_patch: Any) -> None:
    path = write_patch(pico_patch, tmp_path / "p.nestpatch")
    r = CliRunner().invoke(cli, ["report", str(path), "-o", str(tmp_path / "r.html")])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "p.nestpatch", "r-clusters.png", "r-delta_norms.png", "r-neurons.png", "r.html", "r.json"]
    assert "No fold report given" in (tmp_path / "r.html").read_text()


def test_report_bad_inputs(tmp_path: Path, pico_patch: Any) -> None:
    path = write_patch(pico_patch, tmp_path / "p.nestpatch")
    r = CliRunner().invoke(cli, ["report", str(path), "-o", str(tmp_path / "r.html"), "--eval", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "nope: no summary.json" in r.output
    (tmp_path / "f.json").write_text("[1, 2]")
    r = CliRunner().invoke(cli, ["report", str(path), "-o", str(tmp_path / "r.html"), "--fold-report", str(tmp_path / "f.json")])
    assert r.exit_code == 2 and "not a fold report" in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json", "p.nestpatch"]  # nothing written
