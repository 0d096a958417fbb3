"""Signed directories: `sign`, `verify --public-key` and `load(public_key=...)` refuse every
tampering the checksums cannot see, name its cause, and agree with model_signing's own verifier."""
from __future__ import annotations

import dataclasses
import datetime
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

import bloomconv
from bloomconv.cli import main
from bloomconv.errors import (DestinationError, IncompleteDirectoryError, KeyFileError, SignatureError,
                              VerificationError)
from bloomconv.format import JOB_NAME, SIGNATURE_NAME
from bloomconv.hashing import sha256_file
from bloomconv.manifest import FileEntry, read_manifest, write_manifest
from bloomconv.signing import SigningKey, sign

BLOCK = "block_001.safetensors"
CARRIED = "tokenizer_config.json"  # a listed file the model runs without


def pem_private(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def pem_public(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@dataclasses.dataclass
class KeyPair:
    private: Path
    public: Path
    key: ec.EllipticCurvePrivateKey


def make_key_pair(folder: Path, name: str) -> KeyPair:
    key = ec.generate_private_key(ec.SECP256R1())
    (folder / f"{name}.pem").write_bytes(pem_private(key))
    (folder / f"{name}.pub").write_bytes(pem_public(key))
    return KeyPair(folder / f"{name}.pem", folder / f"{name}.pub", key)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    return make_key_pair(folder, "publisher"), make_key_pair(folder, "someone-else")


@pytest.fixture(scope="module")
def signed(converted, keys, tmp_path_factory):
    """`converted`, signed with the publisher's key. Tests that change it must copy it first."""
    directory = tmp_path_factory.mktemp("signed") / "model"
    shutil.copytree(converted, directory)
    sign(directory, SigningKey(keys[0].private))
    return directory


@pytest.fixture
def signed_copy(signed, tmp_path):
    directory = tmp_path / "signed-copy"
    shutil.copytree(signed, directory)
    return directory


def rewrite_manifest_to_match(directory: Path, renamed: dict[str, str] | None = None, added: tuple[str, ...] = ()):
    """Rewrite manifest.json and SHA256SUMS as the converter would for the files as they are now
    (renamed ones under their new name, removed ones left out, `added` ones listed): what someone
    who tampers with the directory can always do. The checksums then hold."""
    renamed = renamed or {}
    manifest = read_manifest(directory)
    files = []
    for entry in manifest.files:
        path = directory / renamed.get(entry.name, entry.name)
        if path.exists():
            files.append(dataclasses.replace(entry, name=path.name, size=path.stat().st_size,
                                             sha256=sha256_file(path)))
    files += [FileEntry(name, (directory / name).stat().st_size, sha256_file(directory / name)) for name in added]
    write_manifest(directory, dataclasses.replace(manifest, files=tuple(files)))
    assert bloomconv.verify(directory).ok  # the checksums alone are fooled


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


# ------------------------------------------------------------------------------ untampered

def test_signed_directory_verifies_with_the_key_and_says_signed_without_it(signed, keys):
    report = bloomconv.verify(signed, public_key=keys[0].public)
    assert report.ok and report.signature.verified and report.signature.method == "key"
    assert report.bytes_hashed == sum(e.size for e in read_manifest(signed).files) and not report.fast
    result = run("verify", "-q", signed, "--public-key", keys[0].public)
    assert result.exit_code == 0 and "signature verified (key: public key" in result.output, result.output
    unchecked = bloomconv.verify(signed)  # model.sig is not an unlisted file
    assert unchecked.ok and unchecked.signature.present and not unchecked.signature.verified
    result = run("verify", "-q", signed)
    assert result.exit_code == 0 and "signed (key), not checked" in result.output
    assert json.loads(run("verify", "-q", "--json", signed).output)["signature"] == {
        "file": SIGNATURE_NAME, "present": True, "method": "key", "checked_against": "", "verified": False}


def test_unsigned_directory_says_so(converted):
    assert str(bloomconv.verify(converted).signature) == "not signed"
    assert "; not signed" in run("verify", "-q", converted).output


def test_a_copy_elsewhere_with_what_the_hub_adds_still_verifies(signed, keys, tmp_path):
    """Nothing in the signature depends on the absolute path or the folder's name."""
    copy = tmp_path / "somewhere" / "else"
    shutil.copytree(signed, copy)
    (copy / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    (copy / ".cache" / "huggingface").mkdir(parents=True)
    (copy / ".cache" / "huggingface" / "download.lock").write_text("")
    assert bloomconv.verify(copy, public_key=keys[0].public).signature.verified
    with bloomconv.load(copy, public_key=keys[0].public) as model:
        assert model.generate("x", max_new_tokens=1, seed=0)


def test_model_signings_own_verifier_accepts_what_bloomconv_signed(signed, keys):
    import model_signing
    model_signing.verifying.Config().use_elliptic_key_verifier(public_key=keys[0].public).verify(
        signed, signed / SIGNATURE_NAME)
    cli = Path(sys.executable).with_name("model_signing")
    result = subprocess.run([cli, "verify", "key", signed, "--signature", signed / SIGNATURE_NAME,
                             "--public_key", keys[0].public], capture_output=True, text=True)
    assert result.returncode == 0 and "Verification succeeded" in result.stdout, result.stderr


# ------------------------------------------------------------------------------ tampering

def replace_block_and_rewrite_manifest(d: Path, keys, tmp_path):
    flip_last_byte(d / BLOCK)
    rewrite_manifest_to_match(d)


def add_file_and_rewrite_manifest(d: Path, keys, tmp_path):
    (d / "notes.txt").write_text("added after signing")
    rewrite_manifest_to_match(d, added=("notes.txt",))


def add_file(d: Path, keys, tmp_path):
    (d / "notes.txt").write_text("added after signing")


def remove_file_and_rewrite_manifest(d: Path, keys, tmp_path):
    (d / CARRIED).unlink()
    rewrite_manifest_to_match(d)


def rename_file_and_rewrite_manifest(d: Path, keys, tmp_path):
    (d / CARRIED).rename(d / "tokenizer_config (1).json")
    rewrite_manifest_to_match(d, renamed={CARRIED: "tokenizer_config (1).json"})


def truncate_signature(d: Path, keys, tmp_path):
    data = (d / SIGNATURE_NAME).read_bytes()
    (d / SIGNATURE_NAME).write_bytes(data[:len(data) // 2])


def swap_in_another_directorys_signature(d: Path, keys, tmp_path):
    """Same key, genuine signature, but of a directory whose block_002 differs."""
    other = tmp_path / "other"
    shutil.copytree(d, other)
    flip_last_byte(other / "block_002.safetensors")
    rewrite_manifest_to_match(other)
    sign(other, SigningKey(keys[0].private))
    shutil.copy(other / SIGNATURE_NAME, d / SIGNATURE_NAME)


def resign_with_another_key(d: Path, keys, tmp_path):
    flip_last_byte(d / BLOCK)
    rewrite_manifest_to_match(d)
    sign(d, SigningKey(keys[1].private))


def remove_signature(d: Path, keys, tmp_path):
    (d / SIGNATURE_NAME).unlink()


TAMPERING = {  # how -> the (file, kind) problems `verify --public-key` must report
    "block replaced, manifest and SHA256SUMS rewritten": (
        replace_block_and_rewrite_manifest, {(BLOCK, "changed since signing"), ("manifest.json", "changed since signing"),
                                             ("SHA256SUMS", "changed since signing")}),
    "file added, manifest rewritten": (
        add_file_and_rewrite_manifest, {("notes.txt", "added since signing"), ("manifest.json", "changed since signing"),
                                        ("SHA256SUMS", "changed since signing")}),
    "file added": (add_file, {("notes.txt", "added since signing"), ("notes.txt", "extra")}),
    "file removed, manifest rewritten": (
        remove_file_and_rewrite_manifest, {(CARRIED, "removed since signing"), ("manifest.json", "changed since signing"),
                                           ("SHA256SUMS", "changed since signing")}),
    "file renamed after signing, manifest rewritten": (
        rename_file_and_rewrite_manifest, {(CARRIED, "removed since signing"),
                                           ("tokenizer_config (1).json", "added since signing"),
                                           ("manifest.json", "changed since signing"),
                                           ("SHA256SUMS", "changed since signing")}),
    "signature truncated": (truncate_signature, {(SIGNATURE_NAME, "signature")}),
    "another directory's signature": (
        swap_in_another_directorys_signature, {("block_002.safetensors", "changed since signing"),
                                               ("manifest.json", "changed since signing"),
                                               ("SHA256SUMS", "changed since signing")}),
    "re-signed with another key": (resign_with_another_key, {(SIGNATURE_NAME, "signature")}),
    "signature removed": (remove_signature, {(SIGNATURE_NAME, "signature")}),
}


@pytest.mark.parametrize("case", TAMPERING)
def test_tampering_is_refused_by_verify_and_load_naming_the_cause(signed_copy, keys, tmp_path, case, monkeypatch):
    tamper, expected = TAMPERING[case]
    tamper(signed_copy, keys, tmp_path)
    report = bloomconv.verify(signed_copy, public_key=keys[0].public)
    assert {(p.file, p.kind) for p in report.problems} == expected, report.problems
    assert not report.signature.verified
    result = run("verify", "-q", signed_copy, "--public-key", keys[0].public)
    assert result.exit_code == 1 and "the signature among them" in result.output, result.output
    assert all(f"{file}: {kind}" in result.output for file, kind in expected), result.output

    from bloomconv.runtime.generate import open_checkpoint  # maps the weight files once verified
    monkeypatch.setattr(sys.modules[open_checkpoint.__module__], "MappedFile",
                        lambda *a, **k: pytest.fail("a weight file was mapped"))
    with pytest.raises(SignatureError) as raised:
        bloomconv.load(signed_copy, public_key=keys[0].public)
    assert all(f"{file}: {kind}" in str(raised.value) for file, kind in expected if kind != "extra")


def test_wrong_public_key_names_the_cause(signed, keys):
    report = bloomconv.verify(signed, public_key=keys[1].public)
    assert [(p.file, p.kind, p.actual) for p in report.problems] == [
        (SIGNATURE_NAME, "signature", "signed by another key")]
    with pytest.raises(SignatureError, match="signed by another key"):
        bloomconv.load(signed, public_key=keys[1].public)


def test_unsigned_directory_is_refused_when_a_key_is_given(converted, keys):
    with pytest.raises(SignatureError, match="no signature file"):
        bloomconv.load(converted, public_key=keys[0].public)
    assert run("generate", converted, "x", "--public-key", keys[0].public).exit_code == 1


def test_a_damaged_directory_is_never_signed(converted_copy, keys):
    """Same-size damage the fast check cannot see: the hashes just signed are not the manifest's."""
    flip_last_byte(converted_copy / BLOCK)
    with pytest.raises(VerificationError, match=f"{BLOCK}: corrupted"):
        sign(converted_copy, SigningKey(keys[0].private))
    assert not (converted_copy / SIGNATURE_NAME).exists()


# ------------------------------------------------------------------------------ keys, PKI

def test_unusable_keys_exit_2_naming_the_file(signed, converted_copy, keys, tmp_path):
    rsa_key = tmp_path / "rsa.pem"
    rsa_key.write_bytes(pem_private(rsa.generate_private_key(public_exponent=65537, key_size=2048)))
    for args, message in [
        (["sign", converted_copy, "--key", tmp_path / "missing.pem"], "missing.pem: cannot read it"),
        (["sign", converted_copy, "--key", keys[0].public], "not a PEM private key (it may be the public key)"),
        (["sign", converted_copy, "--key", rsa_key], "elliptic-curve keys on P-256, P-384 or P-521 only"),
        (["verify", signed, "--public-key", keys[0].private], "not a PEM public key (it may be the private key)"),
        (["verify", signed, "--public-key", keys[0].public, "--identity", "me@example.com", "--issuer", "x"],
         "give one trusted signer"),
    ]:
        result = run(*args)
        assert result.exit_code == 2 and message in result.output, (args, result.output)
    assert not (converted_copy / SIGNATURE_NAME).exists()


def make_certificate(subject: str, public_key, issuer_name: str, issuer_key, ca: bool) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    name = lambda cn: x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])  # noqa: E731
    return (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name(issuer_name))
            .public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=not ca, key_cert_sign=ca, crl_sign=ca,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .sign(issuer_key, hashes.SHA256()))


def test_certificate_signature_checks_against_its_chain(signed_copy, keys, tmp_path):
    ca_key, other_ca_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    for name, key in (("ca", ca_key), ("other-ca", other_ca_key)):
        certificate = make_certificate(f"{name} root", key.public_key(), f"{name} root", key, ca=True)
        (tmp_path / f"{name}.crt").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    leaf = make_certificate("publisher", keys[0].key.public_key(), "ca root", ca_key, ca=False)
    (tmp_path / "publisher.crt").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    result = run("sign", signed_copy, "--key", keys[0].private, "--certificate", tmp_path / "publisher.crt",
                 "--chain", tmp_path / "ca.crt")
    assert result.exit_code == 0 and "signed (certificate)" in result.output, result.output
    assert bloomconv.verify(signed_copy, certificate_chain=[tmp_path / "ca.crt"]).signature.verified
    report = bloomconv.verify(signed_copy, certificate_chain=[tmp_path / "other-ca.crt"])
    assert [(p.file, p.kind) for p in report.problems] == [(SIGNATURE_NAME, "signature")]
    assert not report.signature.verified and report.signature.method == "certificate"


# ------------------------------------------------------------------------------ convert --sign-key

def test_quantize_signs_as_its_last_step(release_checkpoint, keys, tmp_path):
    result = run("quantize", "-q", "--bits", "8", release_checkpoint, tmp_path / "int8", "--sign-key", keys[0].private)
    assert result.exit_code == 0, result.output
    assert bloomconv.verify(tmp_path / "int8", public_key=keys[0].public).signature.verified
    assert not (tmp_path / "int8" / JOB_NAME).exists()


def test_a_bad_signing_key_is_refused_before_converting(release_checkpoint, keys, tmp_path):
    result = run("convert", release_checkpoint, tmp_path / "out", "--sign-key", keys[0].public)
    assert result.exit_code == 2 and "not a PEM private key" in result.output
    assert not (tmp_path / "out").exists()


def test_a_run_killed_before_its_signature_is_incomplete_until_rerun(release_checkpoint, keys, tmp_path, monkeypatch):
    from bloomconv.converters import convert as convert_module
    dst, private = tmp_path / "out", keys[0].private

    def killed(directory, key):
        raise KeyboardInterrupt  # as a SIGKILL would: after the manifest, before model.sig
    monkeypatch.setattr(convert_module, "sign", killed)
    with pytest.raises(KeyboardInterrupt):
        bloomconv.convert(release_checkpoint, dst, signing=SigningKey(private))
    monkeypatch.undo()
    assert (dst / "manifest.json").exists() and not (dst / SIGNATURE_NAME).exists()
    with pytest.raises(IncompleteDirectoryError, match="is not written yet"):
        bloomconv.verify(dst)
    assert run("verify", "-q", dst).exit_code == 2
    with pytest.raises(IncompleteDirectoryError):
        bloomconv.load(dst)
    with pytest.raises(DestinationError, match=f"convert --sign-key {private}"):  # names the command to re-run
        bloomconv.convert(release_checkpoint, dst)
    logged = []
    bloomconv.convert(release_checkpoint, dst, signing=SigningKey(private), log=logged.append)
    assert logged[0].startswith("signed: ") and not (dst / JOB_NAME).exists()
    assert bloomconv.verify(dst, public_key=keys[0].public).signature.verified


def test_signing_a_finished_directory_again_leaves_it_as_it_is(signed_copy, release_checkpoint, keys, tmp_path):
    dst = tmp_path / "out"
    bloomconv.convert(release_checkpoint, dst, signing=SigningKey(keys[0].private))
    before = (dst / SIGNATURE_NAME).read_bytes()
    logged = []
    bloomconv.convert(release_checkpoint, dst, signing=SigningKey(keys[0].private), log=logged.append)
    assert logged == [f"already finished: {dst} holds this conversion (signed); nothing was rewritten"]
    assert (dst / SIGNATURE_NAME).read_bytes() == before


def test_a_signed_source_does_not_carry_its_signature_along(signed, tmp_path):
    bloomconv.convert(signed, tmp_path / "again")
    assert not (tmp_path / "again" / SIGNATURE_NAME).exists() and bloomconv.verify(tmp_path / "again").ok


def test_signature_problems_exit_1_and_key_problems_exit_2():
    from bloomconv.errors import exit_code
    assert exit_code(SignatureError("d", ["model.sig: signature"])) == 1
    assert exit_code(KeyFileError("k.pem", "unreadable", "Fix it.")) == 2
