"""Builds the optional C accelerators; everything else is declared in pyproject.toml.

``telemetry.log._framing`` is the reader's check of a run of frames; ``telemetry.log._natswire``
is the lean NATS reader's frame scan; ``telemetry.eta._live`` is the live ETA estimator's two
hot paths (``LiveJob.step_ended`` and ``LiveJob.estimate_fields``) and the ETA projection's
scoring of a completed job's ETAs (``score_issued``), compiled without fused multiply-adds so
that every float is the Python's. All are optional: where one cannot be compiled (no C
compiler, no Python or zlib headers) the install still succeeds and wantel uses its
pure-Python reference (``telemetry.log.framing.scan_run_py``,
``telemetry.log.nats_wire.scan_frames_py``, the ``LiveJob`` methods,
``telemetry.projections.eta.score_issued``), with the same results.
"""

from setuptools import Extension, setup

WARNINGS = ["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"]

setup(
    ext_modules=[
        # It links zlib, whose headers a machine may lack.
        Extension(
            "telemetry.log._framing",
            sources=["telemetry/log/_framing.c"],
            libraries=["z"],
            optional=True,
            extra_compile_args=WARNINGS,
        ),
        Extension(
            "telemetry.log._natswire",
            sources=["telemetry/log/_natswire.c"],
            optional=True,
            extra_compile_args=WARNINGS,
        ),
        # Floats must be bit-identical to the Python's: no fused multiply-add.
        Extension(
            "telemetry.eta._live",
            sources=["telemetry/eta/_live.c"],
            libraries=["m"],
            optional=True,
            extra_compile_args=[*WARNINGS, "-ffp-contract=off"],
        ),
    ]
)
