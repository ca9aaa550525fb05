"""The example adapter users copy (examples/adapter) really serves its tools, sessions included."""

from __future__ import annotations

from pathlib import Path

import pytest

from snakepit import Client
from tests.fixtures.processes import ProcessFactory

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "adapter"


def test_textstats_adapter_serves_stateless_streaming_and_session_tools(
    procs: ProcessFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", str(EXAMPLE))
    pool = procs.serve("--adapter", "textstats.adapter:TextStatsAdapter", workers=2)
    with Client(pool.address, timeout=20) as client:
        names = {t.name for t in client.list_tools()}
        assert {"word_count", "top_words", "sentences", "add_document", "corpus_top"} <= names
        assert client.execute("word_count", text="The cat and the hat.") == 5
        assert client.execute("top_words", text="the cat and the hat", n=1) == [["the", 2]]
        assert list(client.stream("sentences", text="One. Two! Three?")) == [
            "One.",
            "Two!",
            "Three?",
        ]
        with client.session() as session:
            assert session.execute("add_document", text="red fish blue fish") == 4
            assert session.execute("add_document", text="one fish") == 6
            assert session.execute("corpus_top", n=1) == [["fish", 3]]
