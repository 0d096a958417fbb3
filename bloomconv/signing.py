"""Signed directories: who produced the weights, not only that the bytes survived the transfer.

`sign` writes DIR/model.sig (`format.SIGNATURE_NAME`), a detached signature in the OpenSSF
model-signing format: a Sigstore bundle whose DSSE envelope signs an in-toto statement listing
every file of the directory with its sha256 (all but `format.UNSIGNED_NAMES` and git's files).
It is made by the `model_signing` library, so anyone can check it with that library or its
`model_signing verify` command alone, without bloomconv. `verify(DIR, public_key=...)` and
`load(DIR, public_key=...)` check it with `check_signature`.

What each proves. The manifest and SHA256SUMS: that the bytes are those the converter wrote,
provided the manifest itself is the one it wrote; whoever can change the files can rewrite both.
The signature: that the holder of the private key vouched for exactly these files, with these
bytes; a change to any file, an added or removed one, or a signature by another key is refused.
Neither proves that the key was not stolen, that the public key you check against is really the
publisher's (get it through a channel you trust), or that the weights are any good.

Three ways to sign, as model_signing offers them: an elliptic-curve key (P-256, P-384 or P-521,
PEM, unencrypted), checked against its public key; the same key with its certificate and chain,
checked against the chain's root (PKI); Sigstore keyless signing, checked against an identity and
its OpenID Connect issuer. Sigstore needs network access to Sigstore's servers and a browser or
ambient credentials: here it is a thin pass-through to model_signing, and not tested.

Needs the `sign` extra (`pip install 'bloomconv[sign]'`: model-signing, and pyopenssl, which it
imports without declaring); imported only when a key, chain or identity is used. Telling whether a
directory is signed, and how, needs only the standard library.

>>> sign("bloom-560m-int8", SigningKey("publisher.pem"))                          # doctest: +SKIP
>>> bloomconv.verify("bloom-560m-int8", public_key="publisher.pub").signature     # doctest: +SKIP
"""
from __future__ import annotations

import ast
import base64
import binascii
import dataclasses
import json
import os
import re
import stat
import tempfile
from pathlib import Path

from .atomic import atomic_write_bytes
from .errors import DestinationError, KeyFileError, OptionsError, VerificationError
from .format import CHECKSUMS_NAME, MANIFEST_NAME, SIGNATURE_NAME, UNSIGNED_NAMES
from .hashing import sha256_file
from .manifest import Manifest
from .verification import Problem, SignatureStatus, check_files, load_manifest_for_check

__all__ = ["SigningKey", "TrustedSigner", "check_signature", "sign", "signature_status"]

# A signature lists one line per file: far below this. Anything larger is not one.
MAX_SIGNATURE_BYTES = 16 * 1024 * 1024
SUPPORTED_CURVES = ("secp256r1", "secp384r1", "secp521r1")  # what model_signing signs with


@dataclasses.dataclass(frozen=True)
class SigningKey:
    """How to sign: an elliptic-curve private key (PEM, unencrypted; P-256, P-384 or P-521) and,
    for PKI, that key's certificate and the chain up to a root the verifiers trust.

    >>> SigningKey("publisher.pem").method, SigningKey("k.pem", "k.crt", ("ca.crt",)).method
    ('key', 'certificate')
    """

    private_key: Path
    certificate: Path | None = None
    chain: tuple[Path, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "private_key", Path(self.private_key))
        if self.certificate is not None:
            object.__setattr__(self, "certificate", Path(self.certificate))
        object.__setattr__(self, "chain", tuple(Path(p) for p in self.chain))
        if self.chain and self.certificate is None:
            raise OptionsError("a certificate chain goes with a certificate: give the key's certificate too, "
                               "or leave the chain out to sign with the key alone.")

    @property
    def method(self) -> str:
        return "key" if self.certificate is None else "certificate"

    def check(self) -> None:
        """Raise KeyFileError now for a key or certificate that cannot sign (OptionsError without
        model-signing): `convert` checks before it starts, not after hours of work."""
        _signing_config(self)


@dataclasses.dataclass(frozen=True)
class TrustedSigner:
    """Who must have signed a directory: the holder of a public key's private key, a certificate
    chaining up to one of `certificate_chain`, or a Sigstore `identity` vouched for by `issuer`."""

    public_key: Path | None = None
    certificate_chain: tuple[Path, ...] = ()
    identity: str | None = None
    issuer: str | None = None

    @classmethod
    def from_options(cls, *, public_key: str | os.PathLike | None = None,
                     certificate_chain: tuple[str | os.PathLike, ...] = (), identity: str | None = None,
                     issuer: str | None = None) -> TrustedSigner | None:
        """The signer `verify` and `load` are asked to check against; None when none is given."""
        chain = tuple(Path(p) for p in certificate_chain)
        given = [public_key is not None, bool(chain), identity is not None or issuer is not None]
        if sum(given) > 1:
            raise OptionsError("give one trusted signer: a public key, a certificate chain, or a Sigstore identity "
                               "and issuer, not several.")
        if (identity is None) != (issuer is None):
            raise OptionsError("a Sigstore identity goes with its issuer (e.g. --identity you@example.com "
                               "--issuer https://github.com/login/oauth): give both.")
        if not any(given):
            return None
        return cls(None if public_key is None else Path(public_key), chain, identity, issuer)

    def __str__(self) -> str:
        if self.public_key is not None:
            return f"public key {self.public_key}"
        if self.certificate_chain:
            return f"certificate chain {', '.join(map(str, self.certificate_chain))}"
        return f"Sigstore identity {self.identity} (issuer {self.issuer})"


def sign(directory: str | os.PathLike, key: SigningKey | None = None, *, sigstore: bool = False) -> SignatureStatus:
    """Sign every file of a finished bloomconv directory: write DIR/model.sig, atomically.

    With `key` (see `SigningKey`), offline; with `sigstore=True`, Sigstore keyless signing (network,
    OpenID Connect login; untested here). The directory is checked first (sizes, headers, small
    files, nothing unlisted) and the hashes signed must be the manifest's: a damaged directory is
    never signed (VerificationError, naming the files). An existing signature is replaced. Raises
    KeyFileError for a key or certificate that cannot be used, IncompleteDirectoryError while a
    conversion is unfinished.

    >>> sign("bloom-560m-int8", SigningKey("publisher.pem")).method                 # doctest: +SKIP
    'key'
    >>> sign("bloom-560m-int8", SigningKey("k.pem", "k.crt", ("intermediate.crt", "root.crt")))  # doctest: +SKIP
    """
    if (key is None) == (not sigstore):
        raise OptionsError("sign with a key (--key) or with Sigstore (--sigstore), one of the two.")
    directory = Path(directory)
    config = _signing_config(key)
    manifest = load_manifest_for_check(directory, signature_pending_ok=True)  # signing is what finishes it
    check_files(directory, manifest, fast=True).raise_for_problems()
    with tempfile.TemporaryDirectory() as scratch:  # written outside: never part of what is signed
        made = Path(scratch) / SIGNATURE_NAME
        try:
            config.sign(directory, made)
        except Exception as exc:  # model_signing's own errors (a link in the directory, Sigstore's network, …)
            raise DestinationError(directory, f"cannot sign it: {_one_line(exc)}",
                                   "Sign a directory of regular files as bloomconv writes it; for Sigstore, "
                                   "network access to its servers and an OpenID Connect login are needed.") from None
        data = made.read_bytes()
    signed = _parse(data)
    # The fast check above did not hash the weights; the signature just did. Same hashes, or no signature.
    problems = _compare_with_manifest(directory, manifest, signed.digests)
    if problems:
        raise VerificationError(directory, [str(p) for p in problems])
    atomic_write_bytes(directory / SIGNATURE_NAME, data)
    return SignatureStatus(True, signed.method)


def signature_status(directory: str | os.PathLike) -> SignatureStatus:
    """Whether DIR is signed and by what method, as the signature file says (unchecked: anyone can
    write one)."""
    try:
        data = _read_signature(Path(directory))
    except ValueError:
        return SignatureStatus(True)
    if data is None:
        return SignatureStatus(False)
    try:
        return SignatureStatus(True, _parse(data).method)
    except ValueError:
        return SignatureStatus(True)


def check_signature(directory: Path, manifest: Manifest,
                    trusted: TrustedSigner) -> tuple[list[Problem], SignatureStatus, int]:
    """Check DIR's signature against `trusted`: (problems, status, bytes hashed).

    The signature must verify with the trusted signer, list exactly the files present with their
    bytes (model_signing hashes each; its findings become one problem per file), and its hashes
    must be the manifest's. Raises KeyFileError when the trusted signer's files cannot be used."""
    config = _verifier_config(trusted)
    unchecked = SignatureStatus(False, checked_against=str(trusted))
    try:
        data = _read_signature(directory)
    except ValueError as exc:
        return [Problem(SIGNATURE_NAME, "signature", "a regular file", str(exc))], \
            dataclasses.replace(unchecked, present=True), 0
    if data is None:
        return [Problem(SIGNATURE_NAME, "signature", f"a signature by the {trusted}", "no signature file")], unchecked, 0
    status = dataclasses.replace(unchecked, present=True)
    try:
        signed = _parse(data)
    except ValueError as exc:
        return [Problem(SIGNATURE_NAME, "signature", "an OpenSSF model-signing signature", str(exc))], status, 0
    status = dataclasses.replace(status, method=signed.method)
    hashed = sum(e.size for e in manifest.files)
    with tempfile.TemporaryDirectory() as scratch:  # the bytes parsed above are the bytes verified
        copy = Path(scratch) / SIGNATURE_NAME
        copy.write_bytes(data)
        try:
            config.verify(directory, copy)
        except Exception as exc:  # whatever model_signing raises, the signature is not verified
            mismatches = _mismatches(str(exc), directory, signed.digests)
            if mismatches is not None:  # the signature is genuine, the files are not what it signed
                return mismatches, status, hashed
            return [Problem(SIGNATURE_NAME, "signature", f"signed by the {trusted}", _not_verified(exc))], status, 0
    problems = _compare_with_manifest(directory, manifest, signed.digests)
    return problems, dataclasses.replace(status, verified=not problems), hashed


# --------------------------------------------------------------------------- the signature file

@dataclasses.dataclass(frozen=True)
class _Signed:
    method: str                # key | certificate | sigstore
    digests: dict[str, str]    # file name -> sha256 hex, as signed (authentic once verified)


def _read_signature(directory: Path) -> bytes | None:
    """The signature file's bytes; None when there is none. ValueError for a link, folder, FIFO
    (never opened) or a file too large to be a signature."""
    path = directory / SIGNATURE_NAME
    try:
        st = path.lstat()
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode):
        raise ValueError("not a regular file (a link, a folder or a FIFO)")
    if st.st_size > MAX_SIGNATURE_BYTES:
        raise ValueError(f"{st.st_size:,} bytes, far more than a signature")
    return path.read_bytes()


def _parse(data: bytes) -> _Signed:
    """What a model-signing bundle says it is (ValueError naming what is wrong when it is not one)."""
    try:
        bundle = json.loads(data)
        material = bundle["verificationMaterial"]
        if material.get("tlogEntries"):
            method = "sigstore"
        elif "publicKey" in material:
            method = "key"
        elif "x509CertificateChain" in material or "certificate" in material:
            method = "certificate"
        else:
            raise ValueError("no key or certificate in its verification material")
        statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"], validate=True))
        predicate = statement["predicate"]
        serialization = predicate["serialization"]
        if serialization.get("method") != "files" or serialization.get("hash_type") != "sha256":
            raise ValueError(f"signs by {serialization.get('method')} with {serialization.get('hash_type')}; bloomconv "
                             "checks per-file sha256 signatures (model_signing's default)")
        digests = {r["name"]: r["digest"] for r in predicate["resources"]}
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in digests.items()):
            raise ValueError("a resource without a name or digest")
        return _Signed(method, digests)
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError, binascii.Error) as exc:
        problem = str(exc) if isinstance(exc, ValueError) and not isinstance(exc, json.JSONDecodeError) \
            else f"{type(exc).__name__}: {exc}"
        raise ValueError(f"not an OpenSSF model-signing signature ({problem[:200]})") from None


def _compare_with_manifest(directory: Path, manifest: Manifest, signed: dict[str, str]) -> list[Problem]:
    """The signed hashes of every listed file, SHA256SUMS and the manifest are the manifest's."""
    expected = {e.name: e.sha256 for e in manifest.files}
    for name in (CHECKSUMS_NAME, MANIFEST_NAME):
        expected[name] = sha256_file(directory / name)
    problems = []
    for name, sha256 in expected.items():
        if name not in signed:
            problems.append(Problem(name, "signature", "listed in the signature", "left out of it"))
        elif signed[name] != sha256:
            problems.append(Problem(name, "corrupted", f"sha256 {sha256} (as the manifest lists it)",
                                    f"sha256 {signed[name]} (as signed)"))
    return problems


_MISMATCH = "Signature mismatch: "


def _mismatches(message: str, directory: Path, signed: dict[str, str]) -> list[Problem] | None:
    """model_signing's findings for files that differ from a genuine signature, one problem per
    file; None when `message` is not such a finding. Wording it does not use yet stays whole."""
    if not message.startswith(_MISMATCH):
        return None
    rest = message[len(_MISMATCH):]
    try:
        items = ast.literal_eval(rest)  # a list of strings; literal_eval runs no code
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        items = [rest]
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        items = [rest]
    problems = []
    for item in items:
        if m := re.fullmatch(r"Hash mismatch for '(.*?)': Expected .*", item, re.S):
            problems.append(Problem(m[1], "changed since signing", f"sha256 {signed.get(m[1])} (as signed)",
                                    f"sha256 {_sha256_or_error(directory / m[1])}"))
        elif m := re.fullmatch(r"Extra files found in model '.*?': (.*)", item, re.S):
            problems.extend(Problem(name, "added since signing", "no such file (the signature does not list it)",
                                    "a file") for name in m[1].split(", "))
        elif m := re.fullmatch(r"Missing files in model '.*?': (.*)", item, re.S):
            problems.extend(Problem(name, "removed since signing", "a file (the signature lists it)", "no file")
                            for name in m[1].split(", "))
        else:
            problems.append(Problem(SIGNATURE_NAME, "signature", "every file as signed", item))
    return problems


def _sha256_or_error(path: Path) -> str:
    try:
        return sha256_file(path)
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"


def _not_verified(exc: BaseException) -> str:
    """Why model_signing did not verify a signature, in the report's words."""
    text = _one_line(exc)
    if text.startswith("Key mismatch"):
        return "signed by another key"
    if type(exc).__name__ == "InvalidSignature":
        return "a signature that does not verify with it (altered, or made by another key)"
    return f"not verified ({text})"


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]


# --------------------------------------------------------------------------- model_signing

def _model_signing():
    try:
        import model_signing.hashing
        import model_signing.signing
        import model_signing.verifying
    except ImportError as exc:
        raise OptionsError(f"signatures need the model-signing package, which is not installed ({exc}). "
                           "Install it: pip install 'bloomconv[sign]'.") from None
    return model_signing


def _hashing_config(model_signing):
    """Every file but the signature, a run's bookkeeping and what the Hub adds (and git's files)."""
    return model_signing.hashing.Config().set_ignored_paths(paths=list(UNSIGNED_NAMES), ignore_git_paths=True)


def _signing_config(key: SigningKey | None):
    model_signing = _model_signing()
    config = model_signing.signing.Config().set_hashing_config(_hashing_config(model_signing))
    if key is None:
        return config.use_sigstore_signer()  # untested here: needs the network and a login
    _load_key(key.private_key, private=True)
    for path in (key.certificate, *key.chain):
        if path is not None:
            _load_certificates(path)
    try:
        if key.certificate is None:
            return config.use_elliptic_key_signer(private_key=key.private_key)
        return config.use_certificate_signer(private_key=key.private_key, signing_certificate=key.certificate,
                                             certificate_chain=key.chain)
    except ValueError as exc:  # e.g. a certificate that is not the key's
        raise KeyFileError(key.certificate or key.private_key, _one_line(exc),
                           "Give the certificate issued for this private key.") from None


def _verifier_config(trusted: TrustedSigner):
    model_signing = _model_signing()
    config = model_signing.verifying.Config()
    if trusted.public_key is not None:
        _load_key(trusted.public_key, private=False)
        config.use_elliptic_key_verifier(public_key=trusted.public_key)
    elif trusted.certificate_chain:
        for path in trusted.certificate_chain:
            _load_certificates(path)
        config.use_certificate_verifier(certificate_chain=trusted.certificate_chain)
    else:
        try:  # a thin pass-through to model_signing, untested here: fetches Sigstore's trust root
            config.use_sigstore_verifier(identity=trusted.identity, oidc_issuer=trusted.issuer)
        except Exception as exc:
            raise KeyFileError("Sigstore", f"cannot get Sigstore's trust root ({_one_line(exc)})",
                               "Check the signature where there is network access, or with a public key.") from None
    return config.set_hashing_config(_hashing_config(model_signing))


def _read_key_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise KeyFileError(path, f"cannot read it ({exc.strerror or exc})", "Give the path of a PEM file.") from None


def _load_key(path: Path, *, private: bool) -> None:
    """Check that `path` holds a key model_signing signs or verifies with, naming what is wrong."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    data, kind = _read_key_file(path), "private" if private else "public"
    try:
        key = (serialization.load_pem_private_key(data, None) if private
               else serialization.load_pem_public_key(data))
    except TypeError:  # "Password was not given but private key is encrypted"
        raise KeyFileError(path, "the private key is encrypted", "Sign with an unencrypted copy kept offline, or "
                           "with `model_signing sign key --password`.") from None
    except ValueError:
        other = "public" if private else "private"
        hint = f" (it may be the {other} key)" if f"{other.upper()} KEY" in data.decode("ascii", "replace") else ""
        how = "" if private else " (`openssl ec -in private.pem -pubout` writes it)"
        raise KeyFileError(path, f"not a PEM {kind} key{hint}", f"Give the {kind} key, PEM encoded{how}.") from None
    if not isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)) \
            or key.curve.name not in SUPPORTED_CURVES:
        what = key.curve.name if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)) \
            else type(key).__name__.lstrip("_")
        raise KeyFileError(path, f"a {what} key: model-signing signs with elliptic-curve keys on P-256, P-384 or "
                           "P-521 only", "Make one: `openssl ecparam -name prime256v1 -genkey -noout -out "
                           "private.pem`.")


def _load_certificates(path: Path) -> None:
    from cryptography import x509
    try:
        x509.load_pem_x509_certificates(_read_key_file(path))
    except ValueError:
        raise KeyFileError(path, "not a PEM certificate (or chain of them)", "Give PEM encoded certificates.") from None
