"""Builds shmpool's one compiled module, the alloc/free hot path (shmpool/_fast.c).
Everything else about the package is in pyproject.toml."""

import numpy
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "shmpool._fast",
            sources=["shmpool/_fast.c"],
            include_dirs=[numpy.get_include()],  # element views are numpy arrays made in C
            extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wno-missing-field-initializers"],
        )
    ]
)
