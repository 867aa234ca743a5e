"""Where lines are written: a line at once, or a held block's lines in one write at its end."""

from __future__ import annotations

import io
import json
import logging
import pickle
import sys
import threading
from collections.abc import Iterator

import pytest
import structlog

from exporters.logwriter import LineWriter, held_lines
from wantel.logs import configure_logging


class Recording(io.StringIO):
    """A stream that counts its writes and flushes."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []
        self.flushes = 0

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


@pytest.fixture(name="stream")
def _stream() -> Iterator[Recording]:
    """A recording stream; the root logger's level is put back afterwards."""
    level = logging.getLogger().level
    yield Recording()
    logging.getLogger().setLevel(level)


class TestLineWriter:
    def test_a_line_is_written_and_flushed_at_once(self, stream: Recording) -> None:
        """Outside a held block each line is one write (with its newline) and a flush."""
        writer = LineWriter(stream)
        writer.msg("a")
        assert (["a\n"], 1) == (stream.writes, stream.flushes)
        writer.info("b")
        assert (["a\n", "b\n"], 2) == (stream.writes, stream.flushes)

    def test_held_lines_are_written_at_the_end_in_one_write(self, stream: Recording) -> None:
        """Inside the block nothing is written; at its end every line, in order, in one
        write and one flush: the same text as line by line."""
        writer = LineWriter(stream)
        with held_lines():
            writer.info("a")
            writer.warning("b")
            writer.error("c")
            assert ([], 0) == (stream.writes, stream.flushes)
        assert (["a\nb\nc\n"], 1) == (stream.writes, stream.flushes)

    def test_an_empty_block_writes_nothing(self, stream: Recording) -> None:
        """No line, no write, no flush."""
        with held_lines():
            pass
        assert ([], 0) == (stream.writes, stream.flushes)

    def test_written_even_if_the_block_raises(self, stream: Recording) -> None:
        """The lines held before the error are written, and the error goes on."""
        writer = LineWriter(stream)
        with pytest.raises(RuntimeError), held_lines():
            writer.info("a")
            raise RuntimeError("boom")
        assert "a\n" == stream.getvalue()

    def test_an_inner_block_leaves_them_to_the_outer(self, stream: Recording) -> None:
        """Nested blocks write once, when the outer one ends."""
        writer = LineWriter(stream)
        with held_lines():
            with held_lines():
                writer.info("a")
            assert [] == stream.writes
            writer.info("b")
        assert ["a\nb\n"] == stream.writes

    def test_only_this_threads_lines_are_held(self, stream: Recording) -> None:
        """Another thread's line, written during the block, is written at once."""
        writer = LineWriter(stream)
        with held_lines():
            writer.info("held")
            other = threading.Thread(target=writer.info, args=("other",))
            other.start()
            other.join()
            assert ["other\n"] == stream.writes
        assert ["other\n", "held\n"] == stream.writes

    def test_lines_to_two_files_keep_their_order(self) -> None:
        """Each file gets its own lines in order, a run of one writer's lines at once."""
        first, second = Recording(), Recording()
        one, two = LineWriter(first), LineWriter(second)
        with held_lines():
            one.info("1a")
            one.info("1b")
            two.info("2a")
            one.info("1c")
        assert (["1a\n1b\n", "1c\n"], ["2a\n"]) == (first.writes, second.writes)

    def test_a_writer_to_stderr_pickles(self) -> None:
        """As structlog's WriteLogger does: back as a writer to ``sys.stderr``."""
        back = pickle.loads(pickle.dumps(LineWriter(sys.stderr)))
        assert (LineWriter, sys.stderr) == (type(back), back.file)

    def test_configure_logging_writes_through_it(self, stream: Recording) -> None:
        """structlog's loggers, as configure_logging sets them up, are held too."""
        configure_logging(json=True, stream=stream, stdlib=False)
        log = structlog.get_logger("t")
        with held_lines():
            log.info("one", n=1)
            log.warning("two", n=2)
            assert [] == stream.writes
        (text,) = stream.writes
        assert [("one", "info", 1), ("two", "warning", 2)] == [
            (line["event"], line["level"], line["n"])
            for line in map(json.loads, text.splitlines())]
