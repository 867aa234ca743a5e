"""Types of ``telemetry/log/_framing.c``; ``telemetry.log.framing`` documents it."""

def scan_run(
    buf: bytes, offset: int, first: int, schema: int, limit: int
) -> tuple[bytes | memoryview, int, int] | None: ...

#: Whose CRC-32 it checks with: "zlib-ng" (the writer's, found in the loaded zlib_ng module)
#: or "zlib" (the same checksum, slower).
CRC32: str
