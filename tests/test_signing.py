"""Signatures: keygen, sign, verify-signature, tamper detection, require_signature."""

from __future__ import annotations

import json
import stat
import struct
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from nestpatch.audit.signing import (
    check_signature, generate_keypair, load_public_key, require_signature, sign_patch, signature_status, signing_message,
    verify_signature,
)
from nestpatch.cli import cli
from nestpatch.errors import InputError, SignatureError
from nestpatch.format import Patch, Target, read_patch, write_patch
from nestpatch.format.constants import Doc, Meta
from nestpatch.format.digest import canonical_json


def _patch(seed: int = 0) -> Patch:
    rng = np.random.default_rng(seed)
    t = Target(name="model.layers.0.mlp.up_proj.weight", axis="row", shape=(32, 16),
               indices=np.array([1, 5, 9], np.int32), clusters=np.array([0, 1, 0], np.int32),
               deltas=rng.standard_normal((2, 16)).astype(np.float32),
               base_sketch=rng.standard_normal((3, 9)).astype(np.float32), delta_dtype="F16")
    d = Target(name="model.layers.1.mlp.down_proj.weight", axis="col", shape=(16, 32),
               indices=np.array([0, 31], np.int32), clusters=np.array([0, 0], np.int32),
               deltas=rng.standard_normal((1, 16)).astype(np.float32), delta_dtype="BF16")
    return Patch(targets=[t, d], base={"architecture": "llama", "d_model": 16, "n_ff": 32, "n_layers": 2},
                 policy={"name": "safety", "version": "1.0"},
                 provenance={"seed": 0, "data": [{"role": "harmful", "source": "a.jsonl", "rows": 3, "sha256": "00" * 32}]})


def _header(path: Path) -> tuple[dict, int]:
    raw = path.read_bytes()
    (hlen,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + hlen]), 8 + hlen


def _flip_byte(src: Path, dst: Path, tensor: str, at: int = 3) -> None:
    """Copy ``src`` to ``dst`` with one bit flipped inside ``tensor``'s data."""
    header, start = _header(src)
    raw = bytearray(src.read_bytes())
    raw[start + header[tensor]["data_offsets"][0] + at] ^= 0x01
    dst.write_bytes(bytes(raw))


def _rewrite_doc(src: Path, dst: Path, edit) -> None:
    """Edit the metadata document of a file by hand (what a tamperer would do), tensors kept."""
    raw = src.read_bytes()
    header, start = _header(src)
    doc = json.loads(header["__metadata__"][Meta.DOCUMENT])
    edit(doc)
    header["__metadata__"][Meta.DOCUMENT] = json.dumps(doc, sort_keys=True, separators=(",", ":"))
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * ((8 - len(hb) % 8) % 8)
    dst.write_bytes(struct.pack("<Q", len(hb)) + hb + raw[start:])


@pytest.fixture
def signed(tmp_path: Path) -> tuple[Path, Path, Path]:
    key, pub, _ = generate_keypair(tmp_path / "release.key")
    p = write_patch(_patch(), tmp_path / "p.nestpatch")
    sign_patch(p, key)
    return p, key, pub


def test_keygen_files_and_modes(tmp_path: Path) -> None:
    key, pub, hexkey = generate_keypair(tmp_path / "k")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert pub == tmp_path / "k.pub" and pub.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    assert len(hexkey) == 64
    with pytest.raises(InputError, match="exists already"):
        generate_keypair(tmp_path / "k")
    assert sorted(x.name for x in tmp_path.iterdir()) == ["k", "k.pub"]  # no temp files left


def test_round_trip_keeps_tensors_and_unknown_keys(tmp_path: Path) -> None:
    key, pub, hexkey = generate_keypair(tmp_path / "k")
    plain = write_patch(_patch(), tmp_path / "plain.nestpatch")
    # an unknown top-level key from a newer writer must survive signing (spec: preserve unknown keys)
    _rewrite_doc(plain, plain, lambda d: d.__setitem__("x_future", {"a": 1}))
    before_header, start = _header(plain)
    data_before = plain.read_bytes()[start:]
    sig = sign_patch(plain, key, out=tmp_path / "signed.nestpatch")
    assert plain.read_bytes()[start:] == data_before and Doc.SIGNATURE not in json.loads(
        _header(plain)[0]["__metadata__"][Meta.DOCUMENT])  # input untouched when -o is given
    signed = tmp_path / "signed.nestpatch"
    header, start2 = _header(signed)
    assert signed.read_bytes()[start2:] == data_before  # tensor bytes copied verbatim
    doc = json.loads(header["__metadata__"][Meta.DOCUMENT])
    assert doc["x_future"] == {"a": 1}
    assert doc[Doc.SIGNATURE]["public_key"] == hexkey == sig["public_key"]
    assert len(doc[Doc.SIGNATURE]["value"]) == 128
    # the spec's message, rebuilt independently, verifies with the raw public key
    msg = canonical_json({"content_digest": doc[Doc.CONTENT_DIGEST],
                          "metadata": {k: v for k, v in doc.items() if k != Doc.SIGNATURE}})
    assert msg == signing_message(doc[Doc.CONTENT_DIGEST], doc)
    load_public_key(tmp_path / "k.pub").verify(bytes.fromhex(doc[Doc.SIGNATURE]["value"]), msg)
    res = signature_status(signed, tmp_path / "k.pub")
    assert res.ok and res.signer == hexkey and "good ed25519 signature" in res.reason
    p = read_patch(signed)  # still a valid patch; the signature is visible to readers
    assert p.signature is not None and p.signature["public_key"] == hexkey
    assert require_signature(signed, tmp_path / "k.pub").ok
    # an in-memory Patch cannot carry unknown keys, so it no longer matches: pass paths to require_signature
    with pytest.raises(SignatureError, match=r"metadata changed \(x_future\)"):
        require_signature(p, tmp_path / "k.pub")


def test_in_memory_patch_check(signed: tuple[Path, Path, Path]) -> None:
    path, _, pub = signed
    p = read_patch(path)
    assert check_signature(p, load_public_key(pub)).ok
    p.policy["version"] = "2.0"
    res = check_signature(p, load_public_key(pub))
    assert not res.ok and res.metadata_changed == ["policy"] and not res.tensors_changed


def test_tampered_tensor_byte_is_reported(signed: tuple[Path, Path, Path], tmp_path: Path) -> None:
    path, _, pub = signed
    bad = tmp_path / "bad.nestpatch"
    _flip_byte(path, bad, "model.layers.0.mlp.up_proj.weight/deltas")
    res = signature_status(bad, pub)
    assert not res.ok and res.tensors_changed and res.metadata_changed == []
    assert "tensors changed" in res.reason and "metadata" not in res.reason
    with pytest.raises(SignatureError, match="tensors changed"):
        require_signature(bad, pub)
    r = CliRunner().invoke(cli, ["verify-signature", str(bad), "--pubkey", str(pub)])
    assert r.exit_code == 1 and "FAILED" in r.output and "tensors changed" in r.output


def test_tampered_metadata_is_reported(signed: tuple[Path, Path, Path], tmp_path: Path) -> None:
    path, _, pub = signed
    bad = tmp_path / "bad.nestpatch"
    _rewrite_doc(path, bad, lambda d: d["provenance"]["data"][0].__setitem__("sha256", "ff" * 32))
    res = signature_status(bad, pub)
    assert not res.ok and not res.tensors_changed and res.metadata_changed == ["provenance"]
    assert res.reason == "signature does not match: metadata changed (provenance)"
    # tensors swapped AND the recorded digest updated to match: both parts are named
    both = tmp_path / "both.nestpatch"
    _flip_byte(path, both, "model.layers.1.mlp.down_proj.weight/deltas")
    from nestpatch.audit.signing import _file_state

    actual = _file_state(both).actual_digest
    _rewrite_doc(both, both, lambda d: d.__setitem__(Doc.CONTENT_DIGEST, actual))
    read_patch(both)  # a self-consistent file: only the signature can tell
    res = signature_status(both, pub)
    assert not res.ok and res.tensors_changed and res.metadata_changed == ["content_digest"]
    assert "tensors changed" in res.reason and "metadata changed (content_digest)" in res.reason


def test_wrong_key_and_unsigned(signed: tuple[Path, Path, Path], tmp_path: Path) -> None:
    path, _, _ = signed
    _, other_pub, _ = generate_keypair(tmp_path / "other")
    res = signature_status(path, other_pub)
    assert not res.ok and "signed by another key" in res.reason and "does not match" not in res.reason
    unsigned = write_patch(_patch(1), tmp_path / "u.nestpatch")
    res = signature_status(unsigned, other_pub)
    assert not res.ok and res.reason == "patch is not signed"
    with pytest.raises(SignatureError, match="not signed"):
        require_signature(unsigned, other_pub)


def test_resigning_replaces_signature(signed: tuple[Path, Path, Path], tmp_path: Path) -> None:
    path, _, pub = signed
    key2, pub2, hex2 = generate_keypair(tmp_path / "k2")
    sign_patch(path, key2)
    assert signature_status(path, pub2).ok and not signature_status(path, pub).ok


def test_missing_and_bad_key_files(signed: tuple[Path, Path, Path], tmp_path: Path) -> None:
    path, key, _ = signed
    with pytest.raises(InputError, match="no such public key file"):
        require_signature(path, tmp_path / "nope.pub")
    with pytest.raises(InputError, match="is a private key"):
        load_public_key(key)
    (tmp_path / "junk.pub").write_text("hello")
    with pytest.raises(InputError, match="not a readable public key"):
        load_public_key(tmp_path / "junk.pub")
    r = CliRunner().invoke(cli, ["sign", str(path), "--key", str(tmp_path / "missing.key")])
    assert r.exit_code == 2 and "missing.key: no such private key file" in r.output
    r = CliRunner().invoke(cli, ["verify-signature", str(path), "--pubkey", str(tmp_path / "nope.pub")])
    assert r.exit_code == 2 and "nope.pub: no such public key file" in r.output


def test_hex_and_openssh_public_keys(signed: tuple[Path, Path, Path], tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    path, _, pub = signed
    k = load_public_key(pub)
    (tmp_path / "hex.pub").write_text(read_patch(path).signature["public_key"] + "\n")
    (tmp_path / "ssh.pub").write_bytes(k.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    assert signature_status(path, tmp_path / "hex.pub").ok
    assert signature_status(path, tmp_path / "ssh.pub").ok


def test_cli_round_trip_with_passphrase(tmp_path: Path) -> None:
    runner = CliRunner()
    env = {"NP_PASS": "correct horse"}
    r = runner.invoke(cli, ["keygen", "-o", str(tmp_path / "k"), "--passphrase-env", "NP_PASS"], env=env)
    assert r.exit_code == 0, r.output
    assert b"ENCRYPTED" in (tmp_path / "k").read_bytes()
    p = write_patch(_patch(), tmp_path / "p.nestpatch")
    r = runner.invoke(cli, ["sign", str(p), "--key", str(tmp_path / "k")])
    assert r.exit_code == 2 and "password" in r.output.lower()  # encrypted key, no passphrase given
    r = runner.invoke(cli, ["sign", str(p), "--key", str(tmp_path / "k"), "--passphrase-env", "NP_PASS"], env=env)
    assert r.exit_code == 0, r.output
    r = runner.invoke(cli, ["verify-signature", str(p), "--pubkey", str(tmp_path / "k.pub")])
    assert r.exit_code == 0 and "OK" in r.output
    r = runner.invoke(cli, ["verify-signature", str(p), "--pubkey", str(tmp_path / "k.pub"), "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["ok"] is True
    assert sorted(x.name for x in tmp_path.iterdir()) == ["k", "k.pub", "p.nestpatch"]


def test_key_forms_and_raising_contract(signed: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """require_signature / verify_signature take a path, PEM bytes, hex text or a key object, and raise when bad."""
    path, _, pub = signed
    hexkey = read_patch(path).signature["public_key"]
    for key in (pub, str(pub), pub.read_bytes(), hexkey, bytes.fromhex(hexkey), load_public_key(pub)):
        assert require_signature(path, key).ok
        assert verify_signature(read_patch(path), key).ok
    _, other, _ = generate_keypair(tmp_path / "other")
    with pytest.raises(SignatureError, match="signed by another key"):
        verify_signature(path, other.read_bytes())
    with pytest.raises(InputError, match="no such public key file"):
        verify_signature(path, "not-a-key")


@pytest.mark.parametrize("command", ["chat", "eval"])
def test_chat_and_eval_require_signature(command: str, tmp_path: Path, pico_hf_dir: Path, pico_patch) -> None:
    """``chat`` and ``eval`` refuse a patch not signed by --require-signature's key before any model loads."""
    patch = write_patch(pico_patch, tmp_path / "pico.nestpatch")
    key, pub, _ = generate_keypair(tmp_path / "k")
    _, other_pub, _ = generate_keypair(tmp_path / "other")
    args = {"chat": ["chat", str(pico_hf_dir), "--patch", str(patch), "--backend", "torch"],
            "eval": ["eval", str(pico_hf_dir), "--patch", str(patch), "--suite", "benign", "--backend", "torch",
                     "-o", str(tmp_path / "run")]}[command]
    res = CliRunner().invoke(cli, [*args, "--require-signature", str(pub)], obj={}, input="")
    assert res.exit_code == 2 and "pico.nestpatch: patch is not signed" in res.stderr, (res.output, res.exception)
    sign_patch(patch, key)
    res = CliRunner().invoke(cli, [*args, "--require-signature", str(other_pub)], obj={}, input="")
    assert res.exit_code == 2 and "pico.nestpatch: signed by another key" in res.stderr, (res.output, res.exception)
    assert not (tmp_path / "run").exists()
