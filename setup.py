"""Build the optional C fast path (shmbus/_cfast.c); everything else is in pyproject.toml.

``optional=True``: without a C compiler (or Python headers) the build of the
extension is skipped with a warning and shmbus runs in pure Python.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "shmbus._cfast",
            ["shmbus/_cfast.c"],
            depends=["shmbus/_format.h"],  # generated: python tools/gen_cheader.py
            optional=True,
            extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra", "-Wno-missing-field-initializers"],
            extra_link_args=["-pthread"],
        )
    ]
)
