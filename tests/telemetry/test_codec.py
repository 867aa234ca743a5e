"""Encoding, schema-checked decoding and upcasting of events."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from telemetry.codec import (
    MalformedRecord,
    decode_current_batch,
    decode_each,
    decode_one,
    encode,
    encode_complete,
    encode_json,
)
from telemetry.events import EVENT_TYPES, Event, StepEnded

from .strategies import any_event, event_of

#: A StepEnded record exactly as schema v1 wrote it (``cfg_passes``, no sigma or expert).
STEP_ENDED_V1 = (
    b'{"type":"StepEnded","v":1,"job":"job-7","seq":12,"ts":1764000000000000000,'
    b'"worker":"gpu-3:411","step":4,"total_steps":40,"timestep":875.0,'
    b'"cfg_passes":2,"duration_s":1.21}'
)


def msgpack_array(records: list[bytes]) -> bytes:
    """Records as a frame's MessagePack payload holds them: an array32 header, then each."""
    return b"\xdd" + len(records).to_bytes(4, "big") + b"".join(records)


class TestRoundTrip:
    @pytest.mark.parametrize("cls", EVENT_TYPES, ids=lambda c: c.__name__)
    @given(data=st.data())
    def test_every_type_round_trips(self, cls: type[Event], data: st.DataObject) -> None:
        """Any event of any type decodes back equal to itself, from either stored form."""
        event = data.draw(event_of(cls))
        assert event == decode_one(encode(event))
        assert event == decode_one(encode_json(event))

    @given(events=st.lists(any_event, max_size=20))
    def test_batches_decode_in_one_call(self, events: list[Event]) -> None:
        """A MessagePack array of current records decodes to the same list."""
        assert events == decode_current_batch(msgpack_array([encode(e) for e in events]))

    @given(events=st.lists(any_event, max_size=20))
    def test_json_batches_of_older_logs_decode_too(self, events: list[Event]) -> None:
        """Logs written before MessagePack records hold JSON arrays; they decode the same."""
        payload = b"[" + b",".join(encode_json(e) for e in events) + b"]"
        assert events == decode_current_batch(payload)

    def test_type_tag_is_the_class_name(self) -> None:
        """Records are maps that name their type first, so any MessagePack reader can read one."""
        event = StepEnded(job="j", seq=0, ts=1, step=0, total_steps=1, timestep=1.0)
        assert ["type", "v", "job"] == list(msgspec.msgpack.decode(encode(event)))[:3]
        assert "StepEnded" == msgspec.msgpack.decode(encode(event))["type"]


class TestStoredForm:
    def test_records_leave_out_defaults_but_always_say_their_version(self) -> None:
        """Stored records are small (no nulls) and still name the schema version they used."""
        event = StepEnded(job="j", ts=5, step=0, total_steps=4)
        expected = {"type": "StepEnded", "v": 2, "job": "j", "ts": 5, "step": 0,
                    "total_steps": 4}
        assert expected == msgspec.msgpack.decode(encode(event))
        assert expected == msgspec.json.decode(encode_json(event))

    def test_an_integer_beyond_64_bits_cannot_be_messagepack(self) -> None:
        """The log stores such a batch as JSON instead (tested in test_log_local)."""
        event = StepEnded(job="j", ts=2**70, step=0, total_steps=4)
        with pytest.raises(OverflowError):
            encode(event)
        assert event == decode_one(encode_json(event))

    @pytest.mark.parametrize("cls", EVENT_TYPES, ids=lambda c: c.__name__)
    @given(data=st.data())
    def test_what_people_read_has_every_field(self, cls: type[Event],
                                              data: st.DataObject) -> None:
        """``wantel cat`` and the APIs show one stable shape: every field, defaults too."""
        event = data.draw(event_of(cls))
        shown = msgspec.json.decode(encode_complete(event))
        assert ["type", *cls.__struct_fields__] == list(shown)
        assert event == decode_one(encode_complete(event))


class TestUpcasting:
    def test_v1_step_record_is_upcast(self) -> None:
        """A real v1 StepEnded becomes the current type, its passes kept and new fields None."""
        event = decode_one(STEP_ENDED_V1)
        assert StepEnded(
            v=2, job="job-7", seq=12, ts=1764000000000000000, worker="gpu-3:411", step=4,
            total_steps=40, timestep=875.0, sigma=None, expert=None, passes=2, duration_s=1.21,
        ) == event

    def test_old_records_upcast_the_same_from_messagepack(self) -> None:
        """Upcasting works on named fields, so it does not care which form stored them."""
        as_msgpack = msgspec.msgpack.encode(msgspec.json.decode(STEP_ENDED_V1))
        assert decode_one(STEP_ENDED_V1) == decode_one(as_msgpack)

    def test_newer_version_is_malformed_with_a_hint(self) -> None:
        """A record from a newer wantel is refused with advice, not misread."""
        with pytest.raises(MalformedRecord, match="newer wantel"):
            decode_one(STEP_ENDED_V1.replace(b'"v":1', b'"v":9'))


class TestDecodeEach:
    """Records stored one by one (a NATS message each) decoded in one call."""

    @given(events=st.lists(any_event, max_size=20))
    def test_as_decode_one_on_each(self, events: list[Event]) -> None:
        """Current records in either stored form give what decode_one gives each."""
        records = [encode(e) if i % 3 else encode_json(e) for i, e in enumerate(events)]
        assert [decode_one(r) for r in records] == decode_each(records)

    def test_older_records_among_current_ones_are_upcast(self) -> None:
        """A v1 record (as MessagePack or JSON) among current ones is upcast, in its place."""
        current = encode(StepEnded(job="j", seq=0, ts=1, step=0, total_steps=2,
                                   timestep=1.0, duration_s=0.5))
        as_msgpack = msgspec.msgpack.encode(msgspec.json.decode(STEP_ENDED_V1))
        records = [current, as_msgpack, current, STEP_ENDED_V1]
        assert [decode_one(r) for r in records] == decode_each(records)
        assert [2, 2, 2, 2] == [e.v for e in decode_each(records)]

    def test_a_malformed_record_raises(self) -> None:
        """One record that does not decode fails the call (the reader then quarantines it
        alone)."""
        good = encode(StepEnded(job="j", seq=0, ts=1, step=0, total_steps=2, timestep=1.0,
                                duration_s=0.5))
        with pytest.raises(MalformedRecord):
            decode_each([good, b"\xc1not msgpack", good])


class TestValidation:
    def test_missing_field_is_malformed(self) -> None:
        """A current record without a required field is rejected, not half-accepted."""
        record = b'{"type":"StageEnded","v":1,"job":"j","seq":0,"ts":1,"stage":"decode"}'
        with pytest.raises(MalformedRecord, match="duration_s"):
            decode_one(record)

    def test_wrong_type_is_malformed(self) -> None:
        """A field of the wrong type is rejected."""
        record = (b'{"type":"StageEnded","v":1,"job":"j","seq":0,"ts":1,'
                  b'"stage":"decode","duration_s":"slow"}')
        with pytest.raises(MalformedRecord, match="duration_s"):
            decode_one(record)

    def test_unknown_stage_is_malformed(self) -> None:
        """Stage names are a closed set."""
        record = (b'{"type":"StageStarted","v":1,"job":"j","seq":0,"ts":1,'
                  b'"stage":"teleport"}')
        with pytest.raises(MalformedRecord):
            decode_one(record)

    @pytest.mark.parametrize("record", [
        b"", b"{", b"[]", b'{"type":"Nope","v":1}', b"42",  # as JSON
        b"\xc1", b"\x92\x01\x02", b"\x81\xa4type\xa4Nope", b"\x81\xa4type",  # as MessagePack
    ])
    def test_garbage_is_malformed(self, record: bytes) -> None:
        """Anything that is not an event record is rejected with MalformedRecord."""
        with pytest.raises(MalformedRecord):
            decode_one(record)

    def test_missing_field_is_malformed_in_messagepack_too(self) -> None:
        """Validation does not depend on the stored form."""
        record = msgspec.msgpack.encode({"type": "StageEnded", "v": 1, "job": "j", "seq": 0,
                                         "ts": 1, "stage": "decode"})
        with pytest.raises(MalformedRecord, match="duration_s"):
            decode_one(record)

    def test_bad_batch_raises_so_caller_can_salvage(self) -> None:
        """One bad record fails the fast batch path as a whole."""
        good = encode(StepEnded(job="j", seq=0, ts=1, step=0, total_steps=1, timestep=1.0))
        bad = msgspec.msgpack.encode({"type": "StepEnded"})
        with pytest.raises(MalformedRecord):
            decode_current_batch(msgpack_array([good, bad]))
        with pytest.raises(MalformedRecord):
            decode_current_batch(b"[" + encode_json(StepEnded(job="j", ts=1, step=0,
                                                              total_steps=1))
                                 + b',{"type":"StepEnded"}]')
