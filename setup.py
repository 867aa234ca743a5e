"""Builds the optional C accelerator; everything else is declared in pyproject.toml.

``telemetry._speedups`` is the engine's per-event pass in C. It is optional: where it cannot be
compiled (no C compiler, no Python headers) the install still succeeds and wantel uses the
pure-Python reference, ``telemetry.dedup.fresh_events_py``, with the same results.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "telemetry._speedups",
            sources=["telemetry/_speedups.c"],
            optional=True,
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
        )
    ]
)
