"""Ed25519 signatures inside `.nestpatch` files (spec/nestpatch-v1.md, section 7).

The signed message is ``canonical_json({"content_digest": D, "metadata": M})`` where ``D`` is the
digest of the tensor bytes as they are in the file and ``M`` the metadata document without its
``signature`` key. The signature lives in that document, so a signed patch is still one file.

Why the extra ``sections`` hint: a failed ed25519 check only says "no". Reviewers need to know
*what* changed, so the signer also stores the sha256 of each metadata section as it signed it.
The hint is not trusted for the verdict (only the signature is); it only names the part that no
longer matches: the tensors, or which metadata sections.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError, SignatureError
from ..format.constants import Doc, Meta, SignatureKey
from ..format.digest import canonical_json, content_digest
from ..format.patch import Patch
from ..format.reader import read_document, read_patch
from ..format.safetensors_io import encode_header, read_header
from ..format.writer import compute_digest, metadata_document

log = logging.getLogger(__name__)

ALGORITHM = "ed25519"


# --------------------------------------------------------------------------- keys


def _crypto():
    """Import cryptography lazily: reading patches must not need it."""
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:  # pragma: no cover - the audit extra is installed in CI
        raise InputError("signatures need the 'cryptography' package: pip install 'nestpatch[audit]'") from None
    return serialization, ed25519


def _write_private(path: Path, data: bytes) -> None:
    """Write a secret atomically with mode 0600 from the first byte."""
    from ..atomic import write_bytes_atomic

    write_bytes_atomic(path, data, mode=0o600)


def generate_keypair(private_path: str | os.PathLike, *, passphrase: bytes | None = None,
                     force: bool = False) -> tuple[Path, Path, str]:
    """Create an ed25519 key pair: ``private_path`` (PKCS#8 PEM, mode 0600) and ``<private_path>.pub``.

    Returns:
        ``(private_path, public_path, public_key_hex)``.

    Raises:
        InputError: a key file exists already and ``force`` is false (keys are never overwritten silently).
    """
    serialization, ed25519 = _crypto()
    priv_path = Path(private_path)
    pub_path = priv_path.with_name(priv_path.name + ".pub")
    for p in (priv_path, pub_path):
        if p.exists() and not force:
            raise InputError(f"{p}: key file exists already; pass --force to replace it")
    key = ed25519.Ed25519PrivateKey.generate()
    enc = serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)
    pub_pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    _write_private(priv_path, pem)
    from ..atomic import write_bytes_atomic

    write_bytes_atomic(pub_path, pub_pem)
    return priv_path, pub_path, public_key_hex(key.public_key())


def public_key_hex(public_key: Any) -> str:
    """Raw 32-byte public key as lowercase hex (the form stored in patches)."""
    serialization, _ = _crypto()
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def _read_key_file(path: str | os.PathLike, what: str) -> bytes:
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such {what} file")
    if p.is_dir():
        raise InputError(f"{p}: is a directory, expected a {what} file")
    try:
        return p.read_bytes()
    except OSError as e:
        raise InputError(f"{p}: cannot read {what} file ({e.strerror})") from None


def load_private_key(path: str | os.PathLike, passphrase: bytes | None = None) -> Any:
    """Load an ed25519 private key from PKCS#8 PEM or OpenSSH format."""
    serialization, ed25519 = _crypto()
    data = _read_key_file(path, "private key")
    try:
        if b"OPENSSH PRIVATE KEY" in data:
            key = serialization.load_ssh_private_key(data, password=passphrase)
        else:
            key = serialization.load_pem_private_key(data, password=passphrase)
    except TypeError as e:  # passphrase given for a clear key or missing for an encrypted one
        raise InputError(f"{path}: {e}") from None
    except ValueError as e:
        raise InputError(f"{path}: not a readable private key ({str(e).splitlines()[0]}); expected PKCS#8 PEM from 'nestpatch keygen'") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise InputError(f"{path}: private key is {type(key).__name__}, expected an ed25519 key")
    return key


def parse_public_key(data: bytes, label: str = "public key") -> Any:
    """An ed25519 public key from PEM, OpenSSH (``ssh-ed25519 ...``), 64 hex digits or 32 raw bytes."""
    serialization, ed25519 = _crypto()
    text = data.strip()
    try:
        if len(data) == 32 and not all(32 <= c < 127 for c in data):
            key = ed25519.Ed25519PublicKey.from_public_bytes(data)
        elif text.startswith(b"-----BEGIN"):
            if b"PRIVATE KEY" in text:
                raise InputError(f"{label}: is a private key; pass the public key (the .pub file from 'nestpatch keygen')")
            key = serialization.load_pem_public_key(text)
        elif text.startswith(b"ssh-ed25519"):
            key = serialization.load_ssh_public_key(text)
        else:
            raw = bytes.fromhex(text.decode("ascii"))
            if len(raw) != 32:
                raise ValueError(f"{len(raw)} bytes of hex, expected 32")
            key = ed25519.Ed25519PublicKey.from_public_bytes(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{label}: not a readable public key ({str(e).splitlines()[0]}); expected PEM, OpenSSH or 64 hex digits") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise InputError(f"{label}: public key is {type(key).__name__}, expected an ed25519 key")
    return key


def load_public_key(path: str | os.PathLike) -> Any:
    """Load an ed25519 public key file: PEM, OpenSSH (``ssh-ed25519 ...``) or 64 hex digits."""
    return parse_public_key(_read_key_file(path, "public key"), str(path))


def coerce_public_key(key: Any) -> Any:
    """A public key from what callers hold: a key object, a file path, or the key's bytes/text.

    A ``str`` is a path when such a file exists, else the key itself (hex, PEM or OpenSSH).
    """
    _, ed25519 = _crypto()
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    if isinstance(key, (bytes, bytearray, memoryview)):
        return parse_public_key(bytes(key))
    if isinstance(key, os.PathLike) or (isinstance(key, str) and (os.path.exists(key) or os.sep in key or key.endswith(".pub"))):
        return load_public_key(key)
    if isinstance(key, str):
        try:
            return parse_public_key(key.encode("utf-8"))
        except InputError:
            raise InputError(f"{key}: no such public key file (nor a key in PEM, OpenSSH or hex form)") from None
    raise InputError(f"public key of type {type(key).__name__} not understood; pass a path, PEM/hex text or bytes")


# --------------------------------------------------------------------------- message


def signing_message(digest: str, metadata: dict) -> bytes:
    """The exact bytes that are signed: ``canonical_json({"content_digest": D, "metadata": M})``."""
    m = {k: v for k, v in metadata.items() if k != Doc.SIGNATURE}
    return canonical_json({"content_digest": digest, "metadata": m})


def section_hashes(metadata: dict) -> dict[str, str]:
    """sha256 of each top-level section of the document (signature excluded): the diagnosis hint."""
    return {k: hashlib.sha256(canonical_json(v)).hexdigest() for k, v in sorted(metadata.items()) if k != Doc.SIGNATURE}


@dataclass
class _FileState:
    """What a signature is checked against: the stored document and the digest of the actual tensors."""

    path: str
    document: dict
    actual_digest: str


def _file_state(path: str | os.PathLike) -> _FileState:
    st, doc = read_document(path)
    actual = content_digest((n, st.dtype(n), st.entries[n][1], st.raw(n)) for n in st.entries)
    return _FileState(str(path), doc, actual)


def _patch_state(patch: Patch, label: str = "<patch>") -> _FileState:
    """State of an in-memory patch (as the writer would store it)."""
    digest = compute_digest(patch)
    doc = metadata_document(patch, patch.content_digest or digest)
    return _FileState(label, doc, digest)


# --------------------------------------------------------------------------- sign


def _rewrite_document(path: Path, out: Path, doc: dict) -> None:
    """Rewrite ``path`` to ``out`` with a new metadata document, tensor bytes copied verbatim.

    Copying the data section byte for byte (rather than re-serializing a :class:`Patch`) keeps
    unknown metadata keys and every tensor byte, as the spec requires of rewriting tools.
    """
    from ..atomic import write_bytes_atomic

    src = read_header(path)
    src.header["__metadata__"][Meta.DOCUMENT] = json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False)
    hbytes = encode_header(src.header)
    write_bytes_atomic(out, struct.pack("<Q", len(hbytes)) + hbytes + path.read_bytes()[src.data_start :])


def sign_patch(path: str | os.PathLike, private_key_path: str | os.PathLike, *, out: str | os.PathLike | None = None,
               passphrase: bytes | None = None) -> dict:
    """Sign the patch at ``path`` and write it (atomically) to ``out`` (default: in place).

    The patch is fully validated first (digest included): signing a corrupted file would
    certify the corruption. An existing signature is replaced.

    Returns:
        The signature object stored in the document.
    """
    src = Path(path)
    read_patch(src)  # every invariant, digest included
    key = load_private_key(private_key_path, passphrase)
    state = _file_state(src)
    doc = {k: v for k, v in state.document.items() if k != Doc.SIGNATURE}
    if Doc.SIGNATURE in state.document:
        log.info("%s: replacing the existing signature", src)
    sig = {
        SignatureKey.ALGORITHM: ALGORITHM,
        SignatureKey.PUBLIC_KEY: public_key_hex(key.public_key()),
        SignatureKey.VALUE: key.sign(signing_message(state.actual_digest, doc)).hex(),
        SignatureKey.SECTIONS: section_hashes(doc),
    }
    _rewrite_document(src, Path(out) if out is not None else src, {**doc, Doc.SIGNATURE: sig})
    return sig


# --------------------------------------------------------------------------- verify


@dataclass
class SignatureCheck:
    """Outcome of checking a patch's signature against a trusted public key."""

    path: str
    ok: bool
    reason: str
    signer: str | None = None  # public key hex recorded in the file
    trusted: str | None = None  # public key hex the caller trusts
    tensors_changed: bool = False
    metadata_changed: list[str] = field(default_factory=list)
    content_digest: str | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _diagnose(state: _FileState, sig: dict) -> tuple[bool, list[str]]:
    """Which part no longer matches what was signed: (tensors changed, changed metadata sections)."""
    doc = {k: v for k, v in state.document.items() if k != Doc.SIGNATURE}
    recorded = doc.get(Doc.CONTENT_DIGEST)
    hints = sig.get(SignatureKey.SECTIONS)
    tensors = state.actual_digest != recorded
    sections: list[str] = []
    if isinstance(hints, dict):
        now = section_hashes(doc)
        sections = sorted(k for k in set(now) | set(hints) if now.get(k) != hints.get(k))
        signed_digest_hash = hints.get(Doc.CONTENT_DIGEST)
        actual_hash = hashlib.sha256(canonical_json(state.actual_digest)).hexdigest()
        if signed_digest_hash is not None and signed_digest_hash != actual_hash:
            tensors = True
        if not tensors and Doc.CONTENT_DIGEST in sections:
            sections.remove(Doc.CONTENT_DIGEST)  # cannot happen with honest hints; keep the message sane
    return tensors, sections


def _describe(tensors: bool, sections: list[str], state: _FileState) -> str:
    parts = []
    if tensors:
        parts.append(f"tensors changed (tensor bytes now hash to {state.actual_digest}, "
                     f"not the signed digest)")
    if sections:
        parts.append("metadata changed (" + ", ".join(sections) + ")")
    if not parts:
        return "signature does not match; the file's sections match the signer's hints, so the signature value itself was altered"
    return "signature does not match: " + " and ".join(parts)


def check_signature(state_or_path: str | os.PathLike | Patch, public_key: Any) -> SignatureCheck:
    """Check the signature of a patch file (or in-memory patch) against ``public_key``.

    Never raises for a bad signature: the result says why it failed. Tampered tensor bytes are
    reported, not refused, because the digest is recomputed from the raw bytes here.
    """
    _, ed25519 = _crypto()
    from cryptography.exceptions import InvalidSignature

    state = _patch_state(state_or_path) if isinstance(state_or_path, Patch) else _file_state(state_or_path)
    trusted = public_key_hex(public_key)
    sig = state.document.get(Doc.SIGNATURE)
    res = SignatureCheck(path=state.path, ok=False, reason="", trusted=trusted, content_digest=state.actual_digest)
    if not sig:
        res.reason = "patch is not signed"
        return res
    if not isinstance(sig, dict) or sig.get(SignatureKey.ALGORITHM) != ALGORITHM:
        alg = sig.get(SignatureKey.ALGORITHM) if isinstance(sig, dict) else None
        res.reason = f"signature algorithm {alg!r} is not supported, expected {ALGORITHM!r}"
        return res
    res.signer = str(sig.get(SignatureKey.PUBLIC_KEY, ""))
    try:
        value = bytes.fromhex(str(sig.get(SignatureKey.VALUE, "")))
    except ValueError:
        value = b""
    msg = signing_message(state.actual_digest, state.document)
    if res.signer != trusted:
        # Say whether the file is intact under the key it names; either way it is not trusted.
        intact = False
        try:
            ed25519.Ed25519PublicKey.from_public_bytes(bytes.fromhex(res.signer)).verify(value, msg)
            intact = True
        except (ValueError, InvalidSignature):
            pass
        res.reason = (f"signed by another key ({res.signer[:16]}...), not by the trusted key ({trusted[:16]}...)"
                      + ("" if intact else "; the file does not match that signature either"))
        if not intact:
            res.tensors_changed, res.metadata_changed = _diagnose(state, sig)
        return res
    try:
        public_key.verify(value, msg)
    except InvalidSignature:
        res.tensors_changed, res.metadata_changed = _diagnose(state, sig)
        res.reason = _describe(res.tensors_changed, res.metadata_changed, state)
        return res
    res.ok = True
    res.reason = f"good ed25519 signature by {trusted[:16]}... over {state.actual_digest}"
    return res


def signature_status(path: str | os.PathLike | Patch, pubkey: Any) -> SignatureCheck:
    """Check a patch's signature against ``pubkey`` and return the outcome (never raises for a bad one)."""
    return check_signature(path, coerce_public_key(pubkey))


def require_signature(patch: str | os.PathLike | Patch, pubkey: Any) -> SignatureCheck:
    """Refuse a patch that is not signed by ``pubkey`` (``--require-signature PUB``).

    For ``apply`` and ``attach``: call it with the patch *path* before loading the weights, so the
    check covers the file's exact bytes (an in-memory :class:`Patch` is re-serialized, which drops
    unknown metadata keys a file may carry).

    Args:
        pubkey: the trusted key: a file path (PEM, OpenSSH or hex), the key's bytes or text, or a
            ``cryptography`` Ed25519PublicKey.

    Raises:
        InputError: the key file is missing or unreadable.
        SignatureError: the patch is unsigned, signed by another key, or changed since signing
            (the message says whether tensors or which metadata sections changed).
    """
    res = check_signature(patch, coerce_public_key(pubkey))
    if not res.ok:
        raise SignatureError(f"{res.path}: {res.reason}")
    log.info("%s: %s", res.path, res.reason)
    return res


#: Same contract as :func:`require_signature` (raises on any failure): callers that "verify" a
#: signature expect an exception when it is bad, never a result they might forget to check.
verify_signature = require_signature


__all__ = [
    "ALGORITHM", "SignatureCheck", "generate_keypair", "load_private_key", "load_public_key", "parse_public_key",
    "coerce_public_key",
    "public_key_hex", "sign_patch", "signing_message", "check_signature", "signature_status", "verify_signature",
    "require_signature",
]
