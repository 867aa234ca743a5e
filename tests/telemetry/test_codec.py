"""Encoding, schema-checked decoding and upcasting of events."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from telemetry.codec import (
    MalformedRecord,
    decode_current_batch,
    decode_one,
    encode,
    encode_complete,
)
from telemetry.events import EVENT_TYPES, Event, StepEnded

from .strategies import any_event, event_of

#: A StepEnded record exactly as schema v1 wrote it (``cfg_passes``, no sigma or expert).
STEP_ENDED_V1 = (
    b'{"type":"StepEnded","v":1,"job":"job-7","seq":12,"ts":1764000000000000000,'
    b'"worker":"gpu-3:411","step":4,"total_steps":40,"timestep":875.0,'
    b'"cfg_passes":2,"duration_s":1.21}'
)


class TestRoundTrip:
    @pytest.mark.parametrize("cls", EVENT_TYPES, ids=lambda c: c.__name__)
    @given(data=st.data())
    def test_every_type_round_trips(self, cls: type[Event], data: st.DataObject) -> None:
        """Any event of any type decodes back equal to itself."""
        event = data.draw(event_of(cls))
        assert event == decode_one(encode(event))

    @given(events=st.lists(any_event, max_size=20))
    def test_batches_decode_in_one_call(self, events: list[Event]) -> None:
        """A JSON array of current records decodes to the same list."""
        payload = b"[" + b",".join(encode(e) for e in events) + b"]"
        assert events == decode_current_batch(payload)

    def test_type_tag_is_the_class_name(self) -> None:
        """Records name their type, so any tool can read a log."""
        event = StepEnded(job="j", seq=0, ts=1, step=0, total_steps=1, timestep=1.0)
        assert encode(event).startswith(b'{"type":"StepEnded","v":2,')


class TestStoredForm:
    def test_records_leave_out_defaults_but_always_say_their_version(self) -> None:
        """Stored records are small (no nulls) and still name the schema version they used."""
        record = msgspec.json.decode(encode(StepEnded(job="j", ts=5, step=0, total_steps=4)))
        assert {"type": "StepEnded", "v": 2, "job": "j", "ts": 5, "step": 0,
                "total_steps": 4} == record

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

    def test_newer_version_is_malformed_with_a_hint(self) -> None:
        """A record from a newer wantel is refused with advice, not misread."""
        with pytest.raises(MalformedRecord, match="newer wantel"):
            decode_one(STEP_ENDED_V1.replace(b'"v":1', b'"v":9'))


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

    @pytest.mark.parametrize("record", [b"", b"{", b"[]", b'{"type":"Nope","v":1}', b"42"])
    def test_garbage_is_malformed(self, record: bytes) -> None:
        """Anything that is not an event record is rejected with MalformedRecord."""
        with pytest.raises(MalformedRecord):
            decode_one(record)

    def test_bad_batch_raises_so_caller_can_salvage(self) -> None:
        """One bad record fails the fast batch path as a whole."""
        good = encode(StepEnded(job="j", seq=0, ts=1, step=0, total_steps=1, timestep=1.0))
        with pytest.raises(MalformedRecord):
            decode_current_batch(b"[" + good + b',{"type":"StepEnded"}]')
