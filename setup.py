"""Declares the optional C kernels; everything else about the package lives in pyproject.toml.

`optional=True`: where the extension cannot be compiled (no C compiler) the install still succeeds
and `bloomconv.runtime.kernels.available()` is False, so 4-bit weights are dequantized before
multiplying, as before. No -march flag: the AVX2 code is compiled per function and chosen at run
time. -ffp-contract=off keeps gcc from fusing the multiply-then-add that bitsandbytes rounds twice.
"""
import sys

from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "bloomconv.runtime.kernels._fourbit",
    sources=["runtime/kernels/fourbit.c"],
    extra_compile_args=[] if sys.platform == "win32" else ["-O3", "-ffp-contract=off"],
    optional=True,
)])
