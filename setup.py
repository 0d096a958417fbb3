"""Declares the optional C kernels; everything else about the package lives in pyproject.toml.

One extension, `bloomconv.kernels._kernels`, holds the 4-bit and the dense (int8/bf16/fp16
matrix-vector) kernels and the int8 and 4-bit quantizers, so they share one thread pool.
`optional=True`: where it cannot be compiled (no C compiler) the install still succeeds and
`bloomconv.kernels.available()` is False, so weights are widened or dequantized before multiplying
and quantized with torch instead. No -march flag: the AVX2/AVX-512 code is
compiled per function and chosen at run time. -ffp-contract=off keeps gcc from fusing the
multiply-then-add that bitsandbytes rounds twice.
"""
import sys

from setuptools import Extension, setup

FLAGS = [] if sys.platform == "win32" else ["-O3", "-ffp-contract=off"]
SOURCES = [f"bloomconv/kernels/csrc/{name}.c" for name in ("module", "fourbit", "dense", "int8", "step_ops", "tiles", "parallel")]

setup(ext_modules=[
    Extension("bloomconv.kernels._kernels", sources=SOURCES, depends=["bloomconv/kernels/csrc/kernels.h"],
              extra_compile_args=FLAGS, optional=True),
])
