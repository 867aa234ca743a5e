"""The on-disk frame: how a batch of records is laid out so damage is always detected.

One append writes one frame, with a single ``write()``::

    header (32 bytes, little-endian)
        magic      4s   b"WTL\\x01"
        head_crc   u32  CRC-32 of the 24 header bytes that follow it
        body_len   u32  bytes of table + payload
        count      u32  records in the frame
        first      u64  log position of the first record
        schema     u16  the writer's codec.SCHEMA_FINGERPRINT
        flags      u16  the payload's layout: MSGPACK_ARRAY (1) or JSON_ARRAY (0)
        body_crc   u32  CRC-32 of table + payload
    table   count × (u32 length, u32 CRC-32) — one entry per record
    payload MSGPACK_ARRAY: b"\\xdd" count(u32, big-endian) record₀ record₁ …  — a MessagePack
                array of the records (each a MessagePack map), as wantel writes them now
            JSON_ARRAY:    b"[" record₀ b"," record₁ … b"]" — a JSON array of JSON objects, as
                logs written before MessagePack records hold them (still read)

Why this shape: the payload is one array, so a healthy frame of current-schema records
decodes in a single msgspec call (the replay fast path); the per-record table lets a damaged
frame give up only the records that are actually damaged; the header carries its own CRC and the
frame's first position, so a reader that meets garbage can resynchronise on the next valid header
without miscounting positions; a frame cut short by a crash is recognised because its header
promises more bytes than the file holds.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

try:  # the same CRC-32 as zlib's, ~10x faster (carry-less multiplication): replay checks every byte
    from zlib_ng.zlib_ng import crc32
except ImportError:  # pragma: no cover - a platform without a zlib-ng wheel
    from zlib import crc32

MAGIC: Final = b"WTL\x01"
HEADER: Final = struct.Struct("<4sIIIQHHI")
HEADER_SIZE: Final = HEADER.size  # 32
_HEAD_CRC_FROM: Final = 8  # head_crc covers bytes 8..32
_ENTRY: Final = struct.Struct("<II")
MAX_BODY: Final = 1 << 30  # a sanity bound: no frame is larger than 1 GiB

JSON_ARRAY: Final = 0
MSGPACK_ARRAY: Final = 1
LAYOUTS: Final = frozenset({JSON_ARRAY, MSGPACK_ARRAY})
_MSGPACK_ARRAY32: Final = struct.Struct(">BI")  # 0xdd, then the element count
# HEADER with the magic read as a u32, and schema and layout as one u32 (layout high).
_HEADER_FIELDS: Final = struct.Struct("<IIIIQII")
_MAGIC_INT: Final = int.from_bytes(MAGIC, "little")
_COPY_BELOW: Final = 4096  # a frame body this small is copied rather than viewed


@dataclass(frozen=True, slots=True)
class FrameHeader:
    """A decoded, CRC-checked frame header."""

    body_len: int
    count: int
    first: int
    schema: int
    body_crc: int
    layout: int = MSGPACK_ARRAY

    @property
    def frame_len(self) -> int:
        """Bytes of the whole frame, header included."""
        return HEADER_SIZE + self.body_len

    @property
    def end_position(self) -> int:
        """The log position just after this frame's last record."""
        return self.first + self.count


def encode_body(records: Sequence[bytes], layout: int = MSGPACK_ARRAY) -> bytes:
    """The table and payload of a frame; computed outside the writer's lock."""
    crc = crc32
    table = struct.pack(
        f"<{2 * len(records)}I", *[v for r in records for v in (len(r), crc(r))]
    )
    if layout == MSGPACK_ARRAY:
        return table + _MSGPACK_ARRAY32.pack(0xDD, len(records)) + b"".join(records)
    return table + b"[" + b",".join(records) + b"]"


def encode_header(
    body: bytes, count: int, first: int, schema: int, layout: int = MSGPACK_ARRAY
) -> bytes:
    """The 32-byte header for a body; ``first`` is only known under the writer's lock."""
    tail = HEADER.pack(MAGIC, 0, len(body), count, first, schema, layout, crc32(body))
    head_crc = crc32(tail[_HEAD_CRC_FROM:])
    return MAGIC + struct.pack("<I", head_crc) + tail[_HEAD_CRC_FROM:]


def parse_header(buf: bytes | memoryview, offset: int = 0) -> FrameHeader | None:
    """The header at ``offset``, or ``None`` if those bytes are not a valid header."""
    if len(buf) - offset < HEADER_SIZE:
        return None
    magic, head_crc, body_len, count, first, schema, layout, body_crc = HEADER.unpack_from(
        buf, offset
    )
    if magic != MAGIC:
        return None
    if crc32(buf[offset + _HEAD_CRC_FROM : offset + HEADER_SIZE]) != head_crc:
        return None
    if body_len > MAX_BODY or body_len < count * _ENTRY.size + 2 or layout not in LAYOUTS:
        return None
    return FrameHeader(body_len, count, first, schema, body_crc, layout)


def body_is_intact(header: FrameHeader, body: bytes | memoryview) -> bool:
    """Whether the body matches the CRC its header recorded."""
    return crc32(body) == header.body_crc


def payload_of(header: FrameHeader, body: memoryview) -> memoryview:
    """The array of records of an intact body (MessagePack or JSON: see ``header.layout``)."""
    return body[header.count * _ENTRY.size :]


#: What :func:`scan_run_py` (and its C twin) finds: one MessagePack array of the run's records,
#: how many there are, and the offset in ``buf`` after the run's last frame.
FrameRun = tuple[bytes | memoryview, int, int]
#: The signature both implementations of the run check share.
ScanRun = Callable[[bytes, int, int, int, int], FrameRun | None]


def scan_run_py(buf: bytes, offset: int, first: int, schema: int, limit: int) -> FrameRun | None:
    """A run of healthy frames in ``buf`` from ``offset``, or ``None`` if the frame there is not.

    The run takes frames while each is whole within ``buf``, its header and body check out,
    its layout is MessagePack, it was written with ``schema`` and it starts at the position
    after the previous one (``first`` for the first); it stops before a frame that would take
    it past ``limit`` records (a first frame is taken whatever its size). What stopped it is
    then read frame by frame as before. The checks are :func:`parse_header`'s and
    :func:`body_is_intact`'s, inlined: live emitters write a frame per flush — one or two
    events — and per-frame overhead would cost more than decoding. A run of one frame is a
    view of its payload; a longer run's records are joined under one array header (a small
    frame's copied, cheaper than a view of them; a large one's viewed).

    This is the reference; ``telemetry/log/_framing.c`` does the same checks in C, and a
    :class:`~telemetry.log.local.LocalLog` uses it where it was built unless it is built with
    ``compiled=False`` (:mod:`telemetry.accelerate`).
    """
    # Everything the loop uses is a local: a module global is a dict lookup per use here.
    unpack, crc, view, last = _HEADER_FIELDS.unpack_from, crc32, memoryview(buf), len(buf)
    magic_ok, kind = _MAGIC_INT, schema | MSGPACK_ARRAY << 16
    head_size, head_from, entry_size = HEADER_SIZE, _HEAD_CRC_FROM, _ENTRY.size
    min_body = skip = _MSGPACK_ARRAY32.size
    copy_below = _COPY_BELOW
    first_payload: memoryview | None = None
    more: list[bytes | memoryview] = []
    count = 0
    expected = first
    while offset + head_size <= last:
        magic, head_crc, body_len, n, at, written_as, body_crc = unpack(buf, offset)
        body = offset + head_size
        end = body + body_len
        if (magic != magic_ok or at != expected or written_as != kind or end > last
                or crc(buf[offset + head_from : body]) != head_crc
                or body_len < n * entry_size + min_body):
            break
        if first_payload is None:
            first_body = view[body:end]
            if crc(first_body) != body_crc:
                break
            first_payload = first_body[n * entry_size :]
        else:
            if count + n > limit:
                break
            frame = buf[body:end] if body_len < copy_below else view[body:end]
            if crc(frame) != body_crc:
                break
            more.append(frame[n * entry_size + skip :])
        count += n
        expected += n
        offset = end
    if first_payload is None:
        return None
    if not more:
        return first_payload, count, offset
    payload = _MSGPACK_ARRAY32.pack(0xDD, count) + b"".join(
        [first_payload[skip:], *more])
    return payload, count, offset



def salvage_records(header: FrameHeader, body: memoryview) -> list[memoryview | None]:
    """Each record of a damaged body, or ``None`` for each record whose own CRC fails.

    If the table itself is inconsistent with the payload, nothing in the frame can be trusted
    and every record is reported damaged.
    """
    table_len = header.count * _ENTRY.size
    entries = [_ENTRY.unpack_from(body, i * _ENTRY.size) for i in range(header.count)]
    if header.layout == MSGPACK_ARRAY:  # array header, then records back to back
        opening, separator, closing = _MSGPACK_ARRAY32.size, 0, 0
    else:  # "[", records separated by ",", "]"
        opening, separator, closing = 1, 1, 1
    records_len = sum(length for length, _ in entries)
    expected_payload = (opening + records_len + separator * max(header.count - 1, 0)
                        + closing)
    if expected_payload != len(body) - table_len:
        return [None] * header.count
    out: list[memoryview | None] = []
    offset = table_len + opening
    for length, crc in entries:
        record = body[offset : offset + length]
        out.append(record if crc32(record) == crc else None)
        offset += length + separator
    return out


def find_next_header(buf: bytes | memoryview, start: int) -> int:
    """Offset of the next valid header at or after ``start`` in ``buf``, or -1."""
    data = bytes(buf) if isinstance(buf, memoryview) else buf
    offset = data.find(MAGIC, start)
    while offset != -1:
        if parse_header(data, offset) is not None:
            return offset
        offset = data.find(MAGIC, offset + 1)
    return -1
