"""User text in the recorder: the keyed prompt digest and failure messages never raise, never
leak the prompt, and are always storable."""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

import msgspec
import pytest

from inference.recorder import (
    MAX_MESSAGE,
    WITHHELD,
    JobRecorder,
    prompt_digest,
    quotes,
    sanitise,
    storable,
)
from inference.timing import HostTimer
from telemetry.emitter import Emitter
from telemetry.events import DeviceInfo, JobFailed, JobStarted
from telemetry.log.local import LocalLog
from telemetry.log.memory import MemoryLog
from tests.telemetry.log_contract import events_of

PROMPT = "A Secret Storyboard: the fox crosses the frozen river at dawn"
KEY = b"k" * 32


class TestPromptDigest:
    def test_is_hmac_sha256_under_the_key(self) -> None:
        """Not the plain SHA-256 a guessed prompt could be checked against."""
        expected = hmac.new(KEY, PROMPT.encode(), hashlib.sha256).hexdigest()
        assert expected == prompt_digest(PROMPT, KEY)
        assert hashlib.sha256(PROMPT.encode()).hexdigest() != prompt_digest(PROMPT, KEY)
        assert prompt_digest(PROMPT, KEY) != prompt_digest(PROMPT, b"j" * 32)

    @pytest.mark.parametrize("prompt", ["lone \ud800 surrogate", ["a", "b\udfff"], 12.5,
                                        ("x", None)])
    def test_never_raises(self, prompt: object) -> None:
        """Whatever diffusers accepts as a prompt gets a digest (a lone surrogate included)."""
        digest = prompt_digest(prompt, KEY)
        assert digest is not None and 64 == len(digest)

    def test_an_unprintable_prompt_or_no_key_gives_no_digest(self) -> None:
        """``None``, never an exception, and never an unkeyed digest."""

        class Unprintable:
            def __str__(self) -> str:
                raise RuntimeError("no")

        assert prompt_digest(Unprintable(), KEY) is None
        assert prompt_digest(PROMPT, None) is None

    def test_job_started_carries_the_logs_keyed_digest(self, tmp_path: Any) -> None:
        """Two recorders on one log agree; the digest is keyed with the log's prompt-key."""
        log = LocalLog(tmp_path / "log")
        with Emitter(log, heartbeat_interval=None) as emitter:
            for job in ("a", "b"):
                JobRecorder(emitter, job, timer=HostTimer()).job_started(
                    model="m", family="wan2.1", variant="v", task="t2v", width=32, height=32,
                    num_frames=5, steps=2, guidance_scale=5.0, cfg=True,
                    device=DeviceInfo(kind="cpu", name="cpu"), prompt=PROMPT)
        digests = {e.prompt_sha256 for e in events_of(log.read()) if isinstance(e, JobStarted)}
        key = (tmp_path / "log" / "prompt-key").read_bytes()
        assert {hmac.new(key, PROMPT.encode(), hashlib.sha256).hexdigest()} == digests

    def test_a_recorded_prompt_with_a_lone_surrogate_is_stored_escaped(self) -> None:
        """--record-prompt of such a prompt stores it (escaped) rather than losing JobStarted."""
        log = MemoryLog()
        with Emitter(log, heartbeat_interval=None) as emitter:
            JobRecorder(emitter, "j", timer=HostTimer()).job_started(
                model="m", family="wan2.1", variant="v", task="t2v", width=32, height=32,
                num_frames=5, steps=2, guidance_scale=5.0, cfg=True,
                device=DeviceInfo(kind="cpu", name="cpu"), prompt="odd \ud800 one",
                record_prompt=True)
        (started,) = [e for e in events_of(log.read()) if isinstance(e, JobStarted)]
        assert "odd \\ud800 one" == started.prompt
        msgspec.msgpack.encode(started)


def _formats() -> list[tuple[str, str]]:
    """The six common ways an error message quotes a prompt."""
    multi = "the fox crosses\nthe frozen river at dawn"
    return [
        ("repr with a newline", f"bad prompt {multi!r}"),
        ("JSON-escaped", f"request rejected: {json.dumps({'prompt': multi})}"),
        ("truncated", f"prompt too long: '{PROMPT[:30]}...'"),
        ("case-changed", f"unknown token in {PROMPT.upper()}"),
        ("with newlines", f"could not parse:\n{PROMPT}\nat line 2"),
        ("unicode-escaped", "bad prompt: " + PROMPT.encode("unicode_escape").decode()
         .replace("S", "\\u0053")),
        ("unicode-escaped, non-ASCII", "bad prompt: "
         + json.dumps("le renard traverse la rivière gelée à l'aube")),
    ]


class TestFailureMessages:
    @pytest.mark.parametrize(("name", "message"), _formats(), ids=[n for n, _ in _formats()])
    def test_a_message_quoting_the_prompt_in_any_format_is_withheld(
        self, name: str, message: str
    ) -> None:
        """Exact-substring redaction leaked 4 of these 6 formats; none leaks now."""
        secrets = (PROMPT, "the fox crosses\nthe frozen river at dawn",
                   "le renard traverse la rivière gelée à l'aube")
        assert WITHHELD == sanitise(message, secrets)

    def test_a_message_without_the_prompt_is_kept_on_one_line(self) -> None:
        """Diagnostics survive when they quote nothing of the prompt."""
        message = "CUDA error: an illegal memory access\nwas encountered (step 3)"
        assert ("CUDA error: an illegal memory access was encountered (step 3)"
                == sanitise(message, (PROMPT,)))

    def test_a_fragment_cut_at_the_end_is_withheld(self) -> None:
        """A quote cut short by the message's own truncation still names the prompt."""
        message = "x" * (MAX_MESSAGE - 10) + " '" + PROMPT
        assert WITHHELD == sanitise(message, (PROMPT,))
        assert quotes("invalid: 'A Secret St…", PROMPT)

    def test_short_prompts_are_not_looked_for(self) -> None:
        """A three-letter prompt in a message says nothing of whose it was."""
        assert "fox not found" == sanitise("fox not found", ("fox",))

    @pytest.mark.parametrize("message", ["lone \ud800", "x" * 100_000, ValueError("v\udfff")])
    def test_is_always_bounded_and_storable(self, message: object) -> None:
        """Bounded length, encodable by msgspec whatever the message held."""
        text = sanitise(message)
        assert len(text) <= MAX_MESSAGE
        msgspec.msgpack.encode(text)

    def test_an_exception_whose_str_fails_is_recorded_by_type(self) -> None:
        """JobFailed is still written, naming the exception type."""

        class Weird(Exception):
            def __str__(self) -> str:
                raise RuntimeError("no str for you")

        log = MemoryLog()
        with Emitter(log, heartbeat_interval=None) as emitter:
            recorder = JobRecorder(emitter, "j", timer=HostTimer())
            recorder.job_started(
                model="m", family="wan2.1", variant="v", task="t2v", width=32, height=32,
                num_frames=5, steps=2, guidance_scale=5.0, cfg=True,
                device=DeviceInfo(kind="cpu", name="cpu"))
            recorder.failed(Weird(), secrets=(PROMPT,))
        (failed,) = [e for e in events_of(log.read()) if isinstance(e, JobFailed)]
        assert ("Weird", "Weird") == (failed.error_type, failed.message)

    def test_storable_escapes_lone_surrogates_only(self) -> None:
        """Valid text is unchanged."""
        assert "fine ✓" == storable("fine ✓")
        assert "a\\udc80b" == storable("a\udc80b")
