"""Types of the C accelerator (``telemetry/_speedups.c``); ``telemetry.dedup`` documents it."""

from collections.abc import Collection, Sequence
from typing import Any

def fresh_events(
    events: Sequence[Any], last_seq: dict[str, int], watch: Collection[type]
) -> tuple[list[Any], Any, dict[type, int], list[Any]]: ...
