"""`verify`: prove that a directory holds exactly the bytes its manifest describes, and, given a
trusted signer, that its signature vouches for every one of them.

Findings are collected, never raised one by one, so a damaged transfer is reported in full:
each names the file and what was expected vs found. Exit codes (see cli.py): 0 all good,
1 problems found, 2 manifest missing/unreadable/unknown version or conversion unfinished.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import stat
from collections.abc import Collection
from pathlib import Path

from .errors import (HeaderError, IncompleteDirectoryError, ManifestError, SignatureError,
                     VerificationError)
from .format import (CHECKSUMS_NAME, HF_CACHE_BLOBS, HF_CACHE_REPO_PREFIX, HF_CACHE_SNAPSHOTS, HUB_ADDED_NAMES,
                     JOB_NAME, JOB_SIGNATURE_KEY, JOURNAL_DIR, LOCK_NAME, MANIFEST_NAME, SIGNATURE_NAME)
from .hashing import sha256_files
from .manifest import FileEntry, Manifest, checksums_text, read_manifest
from .progress import ProgressFactory, no_progress
from .safetensors_io import read_header

# What a signature check finds (the other kinds are the manifest's): the signature file itself is
# missing, unreadable, by another signer or leaves files out; or a file differs from what was signed.
SIGNATURE_KINDS = ("signature", "changed since signing", "added since signing", "removed since signing")


@dataclasses.dataclass(frozen=True)
class Problem:
    file: str
    kind: str  # missing | truncated | oversized | corrupted | header | extra | unreadable | outside | not a file,
    #            or one of SIGNATURE_KINDS
    expected: str = ""
    actual: str = ""

    def __str__(self) -> str:
        detail = f": expected {self.expected}, found {self.actual}" if self.expected or self.actual else ""
        return f"{self.file}: {self.kind}{detail}"


@dataclasses.dataclass(frozen=True)
class SignatureStatus:
    """What the directory's signature file (format.SIGNATURE_NAME) is, and whether it was checked.

    `method` (key, certificate, sigstore) is what the file says, which proves nothing by itself;
    `verified` is True only when it was checked against a trusted signer (`checked_against`) and
    every file is as signed."""

    present: bool
    method: str | None = None       # None: absent, or not a model-signing signature
    checked_against: str = ""       # the public key, chain or identity given; "" when not checked
    verified: bool = False

    def to_dict(self) -> dict:
        return {"file": SIGNATURE_NAME, **dataclasses.asdict(self)}

    def __str__(self) -> str:
        if self.verified:
            return f"signature verified ({self.method}: {self.checked_against})"
        if self.checked_against:
            return f"signature NOT verified against {self.checked_against}"
        if not self.present:
            return "not signed"
        if self.method is None:
            return f"{SIGNATURE_NAME} is not a readable model-signing signature (not checked)"
        return (f"signed ({self.method}), not checked: give a public key (or certificate chain, or Sigstore "
                "identity) to check who signed it")


@dataclasses.dataclass(frozen=True)
class Report:
    directory: str
    fast: bool
    files_checked: int
    bytes_hashed: int
    problems: tuple[Problem, ...]
    ignored: tuple[str, ...] = ()  # present but not checked: what the Hub adds (format.HUB_ADDED_NAMES)
    signature: SignatureStatus = SignatureStatus(False)

    @property
    def ok(self) -> bool:
        return not self.problems

    def raise_for_problems(self, ignore_kinds: tuple[str, ...] = ()) -> None:
        """Raise SignatureError when a signature check failed, VerificationError for any other
        problem (except those of `ignore_kinds`)."""
        problems = [p for p in self.problems if p.kind not in ignore_kinds]
        if any(p.kind in SIGNATURE_KINDS for p in problems):
            raise SignatureError(self.directory, [str(p) for p in problems])
        if problems:
            raise VerificationError(self.directory, [str(p) for p in problems])

    def to_dict(self) -> dict:
        return {"directory": self.directory, "ok": self.ok, "mode": "fast" if self.fast else "full",
                "files_checked": self.files_checked, "bytes_hashed": self.bytes_hashed,
                "problems": [dataclasses.asdict(p) for p in self.problems], "ignored": list(self.ignored),
                "signature": self.signature.to_dict()}


def load_manifest_for_check(directory: Path, *, signature_pending_ok: bool = False) -> Manifest:
    """The manifest, or IncompleteDirectoryError when a conversion has not finished here: no
    manifest yet, or (unless `signature_pending_ok`, for the signing itself) a run that signs the
    directory has not written its signature yet."""
    # The lock is all a run has written before its job record.
    if not (directory / MANIFEST_NAME).exists() and ((directory / JOB_NAME).exists()
                                                     or (directory / LOCK_NAME).exists()):
        raise IncompleteDirectoryError(directory, "conversion incomplete: it is still running or was "
                                       "interrupted (no manifest yet)",
                                       "Wait for it, or re-run the same convert command to finish it.")
    manifest = read_manifest(directory)
    if not signature_pending_ok and signature_pending(directory):
        raise IncompleteDirectoryError(directory, f"conversion incomplete: it signs the directory and {SIGNATURE_NAME} "
                                       "is not written yet (still running, or interrupted)",
                                       "Wait for it, or re-run the same command to finish it (or sign the "
                                       "directory with `bloomconv sign`).")
    return manifest


def signature_pending(directory: Path) -> bool:
    """Whether a run's job record says it signs the directory, and the signature is not there yet."""
    if (directory / SIGNATURE_NAME).exists():
        return False
    job = directory / JOB_NAME
    try:
        if not stat.S_ISREG(job.lstat().st_mode):  # never open a planted FIFO or follow a link
            return False
        record = json.loads(job.read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and bool(record.get(JOB_SIGNATURE_KEY))


def verify(directory: str | os.PathLike, *, fast: bool = False, workers: int | None = None,
           progress: ProgressFactory = no_progress, public_key: str | os.PathLike | None = None,
           certificate_chain: tuple[str | os.PathLike, ...] = (), identity: str | None = None,
           issuer: str | None = None, only: Collection[str] | None = None) -> Report:
    """Check every file of a bloomconv directory against its manifest, and its signature against
    a trusted signer when one is given.

    Always checked: each listed file is a regular file inside the directory, of the listed size;
    SHA256SUMS agrees with the manifest and vouches for manifest.json; nothing unlisted (what the
    Hugging Face Hub adds, `.gitattributes` and `.cache/huggingface/`, is ignored and listed as
    such); the small files without tensors (config, tokenizer, index) hash as listed. In a Hugging
    Face cache snapshot (models--org--name/snapshots/<rev>/) a listed file may be a link into that
    repository's blobs/ folder; any other link is refused. Then `fast` checks each
    safetensors header against the manifest's tensors, otherwise every byte is hashed, files in
    parallel on all cores. Raises ManifestError when there is no usable manifest.

    The signature (model.sig, see `bloomconv.signing`): with `public_key`, `certificate_chain` or
    `identity` and `issuer` (Sigstore), it must verify with that signer and list exactly the files
    present, with the hashes the manifest lists; every byte is then hashed once, by the signature
    check, `fast` or not. Without one, `report.signature` only says whether the directory is signed
    and how: that proves nothing about who made it.

    `only`: check just these listed files (names as the manifest lists them), as a pipeline rank
    that holds a share of the blocks does: the others may be absent. No effect with a signer.

    >>> report = verify("bloom-560m-int8")          # doctest: +SKIP
    >>> report.ok, [str(p) for p in report.problems]  # doctest: +SKIP
    >>> verify("bloom-560m-int8", public_key="publisher.pub").signature.verified  # doctest: +SKIP
    True
    """
    from .signing import TrustedSigner, check_signature, signature_status
    trusted = TrustedSigner.from_options(public_key=public_key, certificate_chain=certificate_chain,
                                         identity=identity, issuer=issuer)
    directory = Path(directory)
    manifest = load_manifest_for_check(directory)
    if trusted is None:
        return dataclasses.replace(check_files(directory, manifest, fast, workers, progress, only),
                                   signature=signature_status(directory))
    # The signature check hashes every file (model_signing reads them itself) and its hashes are
    # compared with the manifest's: bloomconv's own pass hashes only the small files.
    report = check_files(directory, manifest, True, workers, progress)
    problems, status, bytes_hashed = check_signature(directory, manifest, trusted)
    order = {e.name: i for i, e in enumerate(manifest.files)}
    ordered = sorted((*report.problems, *problems), key=lambda p: (order.get(p.file, len(order)), p.file))
    return dataclasses.replace(report, fast=bytes_hashed == 0, problems=tuple(ordered),
                               bytes_hashed=bytes_hashed or report.bytes_hashed, signature=status)


def check_files(directory: Path, manifest: Manifest, fast: bool, workers: int | None = None,
                progress: ProgressFactory = no_progress, only: Collection[str] | None = None) -> Report:
    """`verify` against the manifest alone (see there), for a manifest already read."""
    root = directory.resolve()
    blobs = _hf_cache_blobs(root)
    problems: list[Problem] = []
    to_hash: dict[Path, FileEntry] = {}
    entries = [e for e in manifest.files if only is None or e.name in only]
    for entry in entries:
        problem = _check_size_and_header(root, entry, fast, blobs)
        if problem:
            problems.append(problem)
        elif not fast or not entry.tensors:  # config, tokenizer, index: small, and parsed as they are
            to_hash[root / entry.name] = entry
    bytes_hashed = sum(e.size for e in to_hash.values())
    if to_hash:
        with progress(total=bytes_hashed, desc="verify", unit="B", unit_scale=True) as bar:
            digests = sha256_files(list(to_hash), workers, on_bytes=bar.update)
        for path, entry in to_hash.items():
            digest = digests[path]
            if isinstance(digest, OSError):
                problems.append(Problem(entry.name, "unreadable", "readable file", digest.strerror or str(digest)))
            elif digest != entry.sha256:
                problems.append(Problem(entry.name, "corrupted", f"sha256 {entry.sha256}", f"sha256 {digest}"))
    problems.extend(_check_checksums_file(root, manifest))
    extra, ignored = _extra_files(root, manifest)
    problems.extend(extra)
    order = {e.name: i for i, e in enumerate(manifest.files)}
    problems.sort(key=lambda p: (order.get(p.file, len(order)), p.file))
    return Report(str(directory), fast, len(entries), bytes_hashed, tuple(problems), tuple(ignored))


def _hf_cache_blobs(root: Path) -> Path | None:
    """The blobs/ folder of the Hugging Face cache repository whose snapshot `root` (resolved) is."""
    snapshots, repository = root.parent, root.parent.parent
    if snapshots.name == HF_CACHE_SNAPSHOTS and repository.name.startswith(HF_CACHE_REPO_PREFIX):
        return repository / HF_CACHE_BLOBS
    return None


def _check_size_and_header(root: Path, entry: FileEntry, check_header: bool, blobs: Path | None) -> Problem | None:
    path = root / entry.name
    resolved = path.resolve()
    # The cache's own links (snapshots/<rev>/<file> -> ../../blobs/<hash>): the file itself is the
    # link, reached through real folders, and it ends in this repository's blobs/ folder.
    cache_link = (blobs is not None and path.is_symlink() and path.parent.resolve() == path.parent
                  and resolved.parent == blobs)
    if not cache_link and not resolved.is_relative_to(root):  # a symlink leading out of the directory
        return Problem(entry.name, "outside", "a file inside the directory", f"a link to {resolved}")
    if not cache_link and resolved != path:  # names are normalised and root is resolved: a link on the way
        return Problem(entry.name, "not a file", "a regular file", f"a link to {resolved.relative_to(root)}")
    try:
        st = path.stat()
    except FileNotFoundError:
        return Problem(entry.name, "missing", f"{entry.size} bytes", "no file")
    except OSError as exc:
        return Problem(entry.name, "unreadable", "readable file", exc.strerror or str(exc))
    if not stat.S_ISREG(st.st_mode):  # a FIFO would block the hashing for ever
        return Problem(entry.name, "not a file", "a regular file",
                       "a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO, socket or device")
    if st.st_size < entry.size:
        return Problem(entry.name, "truncated", f"{entry.size} bytes", f"{st.st_size} bytes")
    if st.st_size > entry.size:
        return Problem(entry.name, "oversized", f"{entry.size} bytes", f"{st.st_size} bytes")
    if check_header and entry.tensors:
        try:
            header = read_header(path)
        except HeaderError as exc:
            return Problem(entry.name, "header", "a valid safetensors header", exc.problem)
        found = [(i.name, i.dtype, i.shape) for i in sorted(header.tensors.values(), key=lambda i: i.begin)]
        wanted = [(t.name, t.dtype, t.shape) for t in entry.tensors]
        if found != wanted:
            diff = next(((w, f) for w, f in zip(wanted, found) if w != f), (wanted[len(found):][:1], found[len(wanted):][:1]))
            return Problem(entry.name, "header", f"tensors as in the manifest (e.g. {diff[0]})",
                           f"{diff[1]}")
    return None


def _check_checksums_file(root: Path, manifest: Manifest) -> list[Problem]:
    """SHA256SUMS must list the manifest's hashes, and its last line vouches for manifest.json."""
    try:
        text = (root / CHECKSUMS_NAME).read_bytes()
    except FileNotFoundError:
        return [Problem(CHECKSUMS_NAME, "missing", "checksum list", "no file")]
    manifest_json = (root / MANIFEST_NAME).read_bytes()
    expected = checksums_text(manifest, manifest_json)
    if text == expected:
        return []
    if text == expected[:expected.rfind(b"\n", 0, -1) + 1]:  # all but the manifest's line
        return [Problem(CHECKSUMS_NAME, "corrupted", f"a last line for {MANIFEST_NAME}",
                        "none (cut short, or written by an older bloomconv: re-run the conversion)")]
    listed = text.rstrip(b"\n").rpartition(b"\n")[2].decode("utf-8", "replace")
    actual = hashlib.sha256(manifest_json).hexdigest()
    if listed.endswith(f" *{MANIFEST_NAME}") and not listed.startswith(actual):
        return [Problem(MANIFEST_NAME, "corrupted", f"sha256 {listed.partition(' ')[0]} (as SHA256SUMS lists it)",
                        f"sha256 {actual}")]
    return [Problem(CHECKSUMS_NAME, "corrupted", "the hashes in manifest.json", "different content")]


def _extra_files(root: Path, manifest: Manifest) -> tuple[list[Problem], list[str]]:
    """Unlisted files (problems), and the Hub's additions found (ignored, never opened)."""
    # A run killed after writing its manifest leaves its bookkeeping (removed by re-running it):
    # the directory is complete all the same.
    known = {e.name for e in manifest.files} | {MANIFEST_NAME, CHECKSUMS_NAME, SIGNATURE_NAME, JOB_NAME, LOCK_NAME}
    extra, ignored = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        for name in list(dirnames):
            relative = (here / name).relative_to(root).as_posix()
            if relative in HUB_ADDED_NAMES or relative == JOURNAL_DIR:
                dirnames.remove(name)
                if relative in HUB_ADDED_NAMES:
                    ignored.append(relative + "/")
        links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]  # os.walk skips them
        for name in (*filenames, *links):
            relative = (here / name).relative_to(root).as_posix()
            if relative in HUB_ADDED_NAMES:
                ignored.append(relative)
            elif relative not in known:
                extra.append(Problem(relative, "extra", "not in the manifest", "file present"))
    return extra, sorted(ignored)
