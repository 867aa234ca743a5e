"""Builds the optional C accelerators; everything else is declared in pyproject.toml.

``telemetry._speedups`` is the engine's per-event pass, ``telemetry.log._framing`` the reader's
check of a run of frames. Both are optional: where one cannot be compiled (no C compiler, no
Python or zlib headers) the install still succeeds and wantel uses its pure-Python reference
(``telemetry.dedup.fresh_events_py``, ``telemetry.log.framing.scan_run_py``), with the same
results.
"""

from setuptools import Extension, setup

WARNINGS = ["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"]

setup(
    ext_modules=[
        Extension(
            "telemetry._speedups",
            sources=["telemetry/_speedups.c"],
            optional=True,
            extra_compile_args=WARNINGS,
        ),
        # Its own module: it links zlib, whose headers a machine may lack.
        Extension(
            "telemetry.log._framing",
            sources=["telemetry/log/_framing.c"],
            libraries=["z"],
            optional=True,
            extra_compile_args=WARNINGS,
        ),
    ]
)
