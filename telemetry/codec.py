"""Bytes ⇄ events: encoding, schema-checked decoding and upcasting of old versions.

Records are stored as MessagePack maps (one per event, keyed by field name, tagged by ``type``)
and decoded with msgspec against the tagged union, which validates every field. A record that is
missing a field or has a wrong type raises :class:`MalformedRecord`; it is never half-accepted.
MessagePack rather than JSON because replay is decode-bound: the same records decode ~20 %
faster and are ~25 % smaller, and being maps they keep the property upcasting needs — an old
record is a dict of named fields. Logs written before hold JSON objects; both decode here (the
first byte tells them apart: ``{`` never starts a MessagePack map), and ``wantel cat`` prints
either as JSON.

Upcasting happens on read and the stored log is never rewritten (the ``eventsourcing`` library's
rule). An upcaster turns the builtins of version *n* of a type into those of version *n + 1*;
:func:`decode_one` chains them up to the current version. Whole batches take a fast path: a frame
records the :data:`SCHEMA_FINGERPRINT` of the catalogue that wrote it, and when it matches the
reader's (or that of a catalogue this one only added types to: :data:`CURRENT_FINGERPRINTS`),
every record is known to be current and the batch decodes in one msgspec call.
"""

from __future__ import annotations

import operator
import zlib
from collections.abc import Callable, Sequence
from typing import Any, Final

import msgspec

from telemetry.events import EVENT_TYPES, EVENT_TYPES_BY_NAME, AnyEvent, Event, to_builtins
from telemetry.guidance import classify

Builtins = dict[str, Any]
Upcaster = Callable[[Builtins], Builtins]


class MalformedRecord(ValueError):
    """A stored record that does not decode into a current event."""


def _fingerprint(types: Sequence[type[Event]] = EVENT_TYPES) -> int:
    """A 16-bit digest of every type's name and version: equal digests mean equal schemas."""
    text = ",".join(f"{cls.__name__}:{cls.VERSION}" for cls in types)
    return zlib.crc32(text.encode()) & 0xFFFF


SCHEMA_FINGERPRINT: Final = _fingerprint()
#: Types added to the catalogue, oldest first, with no other type's version changed: a record
#: written by the catalogue before them is current for this one.
_ADDED_SINCE: Final = ("StageProgress",)
#: Fingerprints whose batches are wholly current here: this catalogue's, and those of the
#: catalogues before each addition (this one less the types added since; so a log written by
#: the previous release keeps replay's one-call decode).
CURRENT_FINGERPRINTS: Final = frozenset(
    _fingerprint([cls for cls in EVENT_TYPES if cls.__name__ not in _ADDED_SINCE[since:]])
    for since in range(len(_ADDED_SINCE) + 1)
)

_UPCASTERS: dict[tuple[str, int], Upcaster] = {}

#: An event's ``v`` as stored, and its type's current version (C-level, for a whole list).
_VERSION_WRITTEN: Final = operator.attrgetter("v")
_VERSION_CURRENT: Final = operator.attrgetter("VERSION")
_JSON_OBJECT: Final = ord("{")
_JSON_ARRAY: Final = ord("[")

_encoder = msgspec.msgpack.Encoder()
_json_encoder = msgspec.json.Encoder()
_decode_one = msgspec.msgpack.Decoder(AnyEvent).decode
_decode_many = msgspec.msgpack.Decoder(list[AnyEvent]).decode
_decode_raw = msgspec.msgpack.Decoder().decode
_decode_one_json = msgspec.json.Decoder(AnyEvent).decode
_decode_many_json = msgspec.json.Decoder(list[AnyEvent]).decode
_decode_raw_json = msgspec.json.Decoder().decode


def upcaster(type_name: str, from_version: int) -> Callable[[Upcaster], Upcaster]:
    """Register ``fn`` as the step from ``from_version`` to ``from_version + 1`` of a type."""

    def register(fn: Upcaster) -> Upcaster:
        _UPCASTERS[(type_name, from_version)] = fn
        return fn

    return register


def encode(event: Event) -> bytes:
    """One event as stored: a MessagePack map without the fields at their default.

    Raises ``OverflowError`` for an integer MessagePack cannot hold (beyond 64 bits); see
    :func:`encode_many_json`.
    """
    return _encoder.encode(event)


def encode_json(event: Event) -> bytes:
    """One event as a compact JSON object without the fields at their default."""
    return _json_encoder.encode(event)


def encode_complete(event: Event) -> bytes:
    """One event as compact JSON with every field, defaults too (what ``wantel cat`` prints)."""
    return _json_encoder.encode(to_builtins(event))


def encode_many(events: Sequence[Event]) -> list[bytes]:
    """Each event as stored (:func:`encode`), in order."""
    enc = _encoder.encode
    return [enc(e) for e in events]


def encode_many_json(events: Sequence[Event]) -> list[bytes]:
    """Each event as a JSON object: the stored form for a batch MessagePack cannot hold.

    JSON carries integers of any size, so an event with an absurd value (a field past 64
    bits) is still stored rather than lost; readers decode either form.
    """
    enc = _json_encoder.encode
    return [enc(e) for e in events]


def decode_one(data: bytes | memoryview) -> Event:
    """Decode and validate one record (MessagePack or JSON), upcasting an older schema's."""
    is_json = len(data) > 0 and data[0] == _JSON_OBJECT
    try:
        event: Event = (_decode_one_json if is_json else _decode_one)(data)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raw = _raw_or_malformed(data, exc, is_json)
        return _upcast_and_convert(raw)
    if event.v == type(event).VERSION:
        return event
    return _upcast_and_convert(_raw_or_malformed(data, None, is_json))


def decode_each(records: Sequence[bytes | memoryview]) -> list[Event]:
    """Each of ``records`` decoded as :func:`decode_one` does; raises :class:`MalformedRecord`
    at the first that does not decode (the caller then decodes them one by one to quarantine
    only the bad ones).

    For records stored one by one (a NATS message each): the MessagePack decoder straight, and
    :func:`decode_one` only for a record it refuses (JSON, an older schema's) or one of an
    older version — ~0.2 µs a record less than calling :func:`decode_one` on each."""
    decode = _decode_one
    try:
        events: list[Event] = [decode(record) for record in records]
    except (msgspec.ValidationError, msgspec.DecodeError):
        return [decode_one(record) for record in records]
    if list(map(_VERSION_WRITTEN, events)) != list(map(_VERSION_CURRENT, events)):
        for i, event in enumerate(events):  # some older record: upcast it
            if event.v != type(event).VERSION:
                events[i] = decode_one(records[i])
    return events


def decode_current_batch(payload: bytes | memoryview) -> list[Event]:
    """Decode an array of records known to be of the current schema, in one call.

    The array is a MessagePack array of maps, or a JSON array of objects (older logs).
    Raises :class:`MalformedRecord` if any record is invalid; the caller then decodes the records
    one by one to quarantine only the bad ones.
    """
    is_json = len(payload) > 0 and payload[0] == _JSON_ARRAY
    try:
        events: list[AnyEvent] = (_decode_many_json if is_json else _decode_many)(payload)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise MalformedRecord(str(exc)) from exc
    return events  # type: ignore[return-value]  # list is invariant; every member is an Event


def _raw_or_malformed(data: bytes | memoryview, cause: Exception | None,
                      is_json: bool) -> Builtins:
    form = "JSON" if is_json else "MessagePack"
    try:
        raw = (_decode_raw_json if is_json else _decode_raw)(data)
    except msgspec.DecodeError as exc:
        raise MalformedRecord(f"not {form}: {exc}") from exc
    if not isinstance(raw, dict):
        raise MalformedRecord(f"record is not a {form} map")
    if raw.get("type") not in EVENT_TYPES_BY_NAME:
        raise MalformedRecord(f"unknown event type {raw.get('type')!r}")
    if cause is not None and raw.get("v", 1) == EVENT_TYPES_BY_NAME[raw["type"]].VERSION:
        # Current version, yet it failed validation: the record itself is wrong.
        raise MalformedRecord(str(cause)) from cause
    return raw


def _upcast_and_convert(raw: Builtins) -> Event:
    type_name: str = raw["type"]
    current = EVENT_TYPES_BY_NAME[type_name].VERSION
    version = raw.get("v", 1)
    if not isinstance(version, int) or version < 1:
        raise MalformedRecord(f"{type_name}: bad schema version {version!r}")
    if version > current:
        raise MalformedRecord(
            f"{type_name} v{version} was written by a newer wantel (this one reads up to "
            f"v{current}); upgrade wantel to read it"
        )
    while version < current:
        step = _UPCASTERS.get((type_name, version))
        if step is None:
            raise MalformedRecord(f"no upcaster for {type_name} v{version} → v{version + 1}")
        raw = step(dict(raw))
        version += 1
        raw["v"] = version
    try:
        event: Event = msgspec.convert(raw, AnyEvent)
    except msgspec.ValidationError as exc:
        raise MalformedRecord(f"{type_name} v{raw.get('v')}: {exc}") from exc
    return event


@upcaster("StepEnded", 1)
def _step_ended_v1_to_v2(raw: Builtins) -> Builtins:
    """v1 counted transformer passes as ``cfg_passes`` and knew no sigma or expert."""
    raw["passes"] = raw.pop("cfg_passes", 1)
    raw.setdefault("sigma", None)
    raw.setdefault("expert", None)
    return raw


@upcaster("JobFailed", 1)
def _job_failed_v1_to_v2(raw: Builtins) -> Builtins:
    """v1 had no category (told now from what it recorded) and no suggestions."""
    raw["category"] = classify(
        error_type=str(raw.get("error_type") or ""), message=str(raw.get("message") or ""),
        stage=raw.get("stage"), oom=bool(raw.get("oom", False)))
    raw.setdefault("suggestions", [])
    return raw
