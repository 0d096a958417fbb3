"""What `bloomconv env` reports: versions, the compiled kernels, CUDA devices, the platform.

For bug reports, like `hf env` and `python -m bitsandbytes`. Package versions come from their
installed metadata, so nothing is imported but torch (already needed for the kernels and CUDA).

>>> report = environment_report()                                          # doctest: +SKIP
>>> report["kernels"], report["packages"]["bitsandbytes"]                   # doctest: +SKIP
({'built': True, 'isas': ['avx512', 'avx2', 'scalar'], 'bf16_tiles': True, 'int8_dot_products': True, 'threads': 16},
 '0.50.2')
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from pathlib import Path

import bloomconv

__all__ = ["PACKAGES", "environment_report"]

# What bloomconv uses, and what transformers' from_pretrained of a quantized directory needs.
PACKAGES = ("torch", "bitsandbytes", "transformers", "safetensors", "huggingface_hub", "tokenizers",
            "accelerate", "numpy")


def environment_report() -> dict:
    """A JSON-ready description of this installation; a package that is not installed is None.

    Keys: bloomconv (version, location), python (version, implementation, executable),
    packages (name -> version), kernels (built, isas, AMX bf16 tiles, threads), torch (cuda, cpu_capability),
    cuda_devices (index, name, capability, memory_bytes) or cuda_error, platform (system,
    machine, cpus, usable_cpus, memory_bytes).
    """
    import torch

    from . import kernels
    report = {
        "bloomconv": {"version": bloomconv.__version__, "location": str(Path(bloomconv.__file__).parent)},
        "python": {"version": platform.python_version(), "implementation": platform.python_implementation(),
                   "executable": sys.executable},
        "packages": {name: _installed_version(name) for name in PACKAGES},
        "kernels": {"built": kernels.available(), "isas": list(kernels.isas()), "bf16_tiles": kernels.bf16_tiles(),
                    "int8_dot_products": kernels.int8_dot_products(), "threads": kernels.kernel_threads()},
        "torch": {"cuda": torch.version.cuda, "cpu_capability": torch.backends.cpu.get_cpu_capability()},
        "platform": {"system": platform.platform(), "machine": platform.machine(), "cpus": os.cpu_count(),
                     "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
                     "memory_bytes": _physical_memory()},
    }
    try:
        report["cuda_devices"] = _cuda_devices(torch)
    except Exception as exc:  # a broken driver is exactly what a bug report must show, not hide behind a traceback
        report["cuda_devices"], report["cuda_error"] = [], f"{type(exc).__name__}: {exc}"
    return report


def _installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cuda_devices(torch) -> list[dict]:
    if not torch.cuda.is_available():
        return []
    devices = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        devices.append({"index": index, "name": props.name, "capability": f"{props.major}.{props.minor}",
                        "memory_bytes": props.total_memory})
    return devices


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not POSIX, or the name is unknown here
        return None
