"""Every error bloomconv raises on purpose. Each carries the facts and ends with the fix.

`EXIT_CODES` is the one table from error type to the CLI's exit code; nothing else decides them.
"""
from __future__ import annotations


class BloomconvError(Exception):
    """Base class of every error bloomconv raises on purpose."""


class OptionsError(BloomconvError):
    """Options that contradict each other or do not apply (e.g. a block size for int8)."""


class SourceError(BloomconvError):
    """The source checkpoint is missing, damaged or not what its config says."""

    def __init__(self, path, problem: str, fix: str):
        self.path, self.problem, self.fix = str(path), problem, fix
        super().__init__(f"{self.path}: {problem}. {fix}")


class NotBloomError(SourceError):
    """The checkpoint is not a BLOOM model."""


class UnsafeCheckpointError(SourceError):
    """A pickle shard tried to import or call something other than tensor data."""

    def __init__(self, path, detail: str):
        super().__init__(
            path,
            f"refused to load: the pickle references code, not just tensors ({detail}); "
            "nothing from it was executed",
            "Only convert checkpoints from a source you trust, or get the safetensors release.",
        )


class DestinationError(BloomconvError):
    """The destination cannot be written as asked."""

    def __init__(self, path, problem: str, fix: str):
        self.path, self.problem, self.fix = str(path), problem, fix
        super().__init__(f"{self.path}: {problem}. {fix}")


class DestinationBusyError(DestinationError):
    """Another bloomconv process holds the destination's lock."""


class ManifestError(BloomconvError):
    """The manifest is missing, unreadable or of an unknown version (exit 2)."""

    def __init__(self, path, problem: str, fix: str = "Re-run the conversion that made this directory."):
        self.path, self.problem, self.fix = str(path), problem, fix
        super().__init__(f"{self.path}: {problem}. {fix}")


class IncompleteDirectoryError(ManifestError):
    """A conversion into the directory has not finished (no manifest yet, job record present)."""


class HeaderError(BloomconvError):
    """A safetensors header is malformed or disagrees with the file."""

    def __init__(self, path, problem: str):
        self.path, self.problem = str(path), problem
        super().__init__(f"{self.path}: invalid safetensors header: {problem}. "
                         "The file is damaged; copy it again or re-run the conversion.")


class VerificationError(BloomconvError):
    """Files do not match the manifest (exit 1). `problems` lists each finding."""

    def __init__(self, directory, problems):
        self.directory, self.problems = str(directory), list(problems)
        lines = "\n".join(f"  {p}" for p in self.problems)
        super().__init__(f"{self.directory}: {len(self.problems)} problem(s):\n{lines}\n"
                         "Copy the named files again, or re-run the conversion.")


class SignatureError(VerificationError):
    """The directory is not what the trusted signer signed (exit 1): the signature is missing,
    unreadable or made with another key, or files were changed, added or removed since signing.
    `problems` lists each finding, naming the file."""

    def __init__(self, directory, problems):
        self.directory, self.problems = str(directory), list(problems)
        lines = "\n".join(f"  {p}" for p in self.problems)
        BloomconvError.__init__(
            self, f"{self.directory}: {len(self.problems)} problem(s), the signature among them:\n{lines}\n"
            "Do not use these files: get the directory again from its publisher, and their public key (or "
            "certificate chain) through a channel you trust.")


class KeyFileError(BloomconvError):
    """A key, certificate or certificate chain cannot be used to sign or to check a signature:
    missing, unreadable, or of a kind model-signing does not take (exit 2)."""

    def __init__(self, path, problem: str, fix: str):
        self.path, self.problem, self.fix = str(path), problem, fix
        super().__init__(f"{self.path}: {problem}. {fix}")


class RecipeError(BloomconvError):
    """An unknown recipe name or an invalid recipe file."""


class QuantizationError(BloomconvError):
    """A weight cannot be stored in the quantized format asked for, or its stored state is invalid."""

    def __init__(self, tensor: str, problem: str, fix: str):
        self.tensor, self.problem, self.fix = tensor, problem, fix
        super().__init__(f"{tensor}: {problem}. {fix}")


class MemoryBudgetError(BloomconvError):
    """The RAM budget, or the memory left on this machine, is below what a run needs at least: raised
    before any weight is read, instead of the OOM killer later. Carries the bytes `needed` and the
    bytes `allowed`, what they are (`problem`), and the fix."""

    def __init__(self, path, needed: int, allowed: int, problem: str, fix: str):
        self.path, self.needed, self.allowed, self.problem, self.fix = str(path), needed, allowed, problem, fix
        super().__init__(f"{self.path}: {problem}. {fix}")


class PipelineError(BloomconvError):
    """A run over several processes or machines (`runtime.pipeline`) failed: a rank refused to start
    (its message names the rank and, for damaged files, the file), was lost, sent nothing within
    the timeout, or sent what the model's geometry does not allow (exit 3)."""


class BloomconvWarning(UserWarning):
    """Something a user should know about a finished job that is not an error (e.g. 4-bit weights
    that bitsandbytes' CPU decoder gets wrong). The CLI prints these as one line."""


# Most specific class first: the first `isinstance` match decides.
EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (SignatureError, 1),      # the files are not what the trusted signer signed
    (VerificationError, 1),   # the files differ from what the converter wrote
    (KeyFileError, 2),        # a key or certificate that cannot be used
    (PipelineError, 3),       # a rank of a pipeline refused to start, was lost or hung
    (BloomconvError, 2),      # bad input, an unusable manifest, anything else refused
)


def exit_code(error: BaseException) -> int:
    """The CLI's exit code for `error` (2 for any BloomconvError not listed above it)."""
    return next(code for kind, code in EXIT_CODES if isinstance(error, kind))
