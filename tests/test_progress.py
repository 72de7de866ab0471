"""Progress bars: drawn on a terminal, silent in a log file (the phases log their own lines there)."""

from __future__ import annotations

import io

from metatransfer.progress import progress_bar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_off_a_terminal_the_bar_is_disabled_and_still_usable():
    stream = io.StringIO()
    bar = progress_bar(range(3), desc="x", file=stream)
    assert bar.disable and list(bar) == [0, 1, 2]
    bar.set_postfix(loss="0.1")
    with progress_bar(total=5, file=stream) as counter:
        counter.update(5)
    assert stream.getvalue() == ""


def test_on_a_terminal_the_bar_draws_unless_disabled_by_the_caller():
    terminal = _Terminal()
    assert list(progress_bar(range(3), desc="x", file=terminal)) == [0, 1, 2]
    assert "\r" in terminal.getvalue()
    quiet = _Terminal()
    assert progress_bar(range(3), file=quiet, disable=True).disable  # e.g. disable=not is_main() on rank 1
    assert quiet.getvalue() == ""


def test_the_default_stream_is_stderr(monkeypatch):
    monkeypatch.setattr("sys.stderr", _Terminal())
    assert not progress_bar(range(1)).disable
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert progress_bar(range(1)).disable
