"""Declares the optional C kernels; everything else about the package lives in pyproject.toml.

`optional=True`: where an extension cannot be compiled (no C compiler) the install still succeeds
and `bloomconv.runtime.kernels.available()` (4-bit) or `dense_available()` (int8/bf16/fp16
matrix-vector) is False, so weights are widened before multiplying instead. No -march flag: the
AVX2/AVX-512 code is compiled per function and chosen at run time. -ffp-contract=off keeps gcc
from fusing the multiply-then-add that bitsandbytes rounds twice.
"""
import sys

from setuptools import Extension, setup

FLAGS = [] if sys.platform == "win32" else ["-O3", "-ffp-contract=off"]
HEADERS = ["runtime/kernels/parallel.h", "runtime/kernels/x86.h"]

setup(ext_modules=[
    Extension("bloomconv.runtime.kernels._fourbit", sources=["runtime/kernels/fourbit.c"], depends=HEADERS,
              extra_compile_args=FLAGS, optional=True),
    Extension("bloomconv.runtime.kernels._dense", sources=["runtime/kernels/dense.c"], depends=HEADERS,
              extra_compile_args=FLAGS, optional=True),
])
