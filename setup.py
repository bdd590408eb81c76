"""Builds shmpool's one compiled module, shmpool._core, from shmpool/_core/*.c.

Its header layout.h is generated here from the layout table, shmpool/_layout.py
(loaded by path: the package itself is not importable before it is built), so
that the segment's layout is written once. Everything else about the package is
in pyproject.toml.
"""

import sys

if not sys.platform.startswith("linux"):
    sys.exit(f"shmpool runs on Linux only: it needs POSIX shared memory and futexes (this is {sys.platform}).")

import glob
import importlib.util
import os
import sys

import numpy
from setuptools import Extension, setup

HERE = os.path.dirname(os.path.abspath(__file__))
CORE = os.path.join("shmpool", "_core")


def write_layout_header() -> None:
    spec = importlib.util.spec_from_file_location("_shmpool_layout_table", os.path.join(HERE, "shmpool", "_layout.py"))
    table = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = table  # (a dataclass needs its module registered)
    spec.loader.exec_module(table)
    text = table.c_header()
    path = os.path.join(HERE, CORE, "layout.h")
    if not os.path.exists(path) or open(path).read() != text:
        with open(path, "w") as f:
            f.write(text)


write_layout_header()

setup(
    ext_modules=[
        Extension(
            "shmpool._core",
            sources=sorted(glob.glob(os.path.join(CORE, "*.c"))),
            depends=sorted(glob.glob(os.path.join(CORE, "*.h"))) + [os.path.join("shmpool", "_layout.py")],
            include_dirs=[numpy.get_include(), CORE],  # element views are numpy arrays made in C
            # -flto: the files are split by concern; the hot path (alloc, free, the cache) still inlines across them
            extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wno-missing-field-initializers", "-flto",
                                "-fvisibility=hidden"],
            extra_link_args=["-O2", "-flto"],
        )
    ]
)
