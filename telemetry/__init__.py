"""wantel's core: event types, the append-only log, projections and the ETA model.

Pure Python: imports neither torch nor any exporter.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("wan-telemetry")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
