"""Text statistics as Snakepit tools.

Stateless tools take their input and return a result; the session tools keep a running word
count in the session store, so any worker of the pool can continue a session another started.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

from snakepit import Adapter, SessionContext, tool

WORD = re.compile(r"[\w']+")


def words(text: str) -> list[str]:
    return [w.lower() for w in WORD.findall(text)]


class TextStatsAdapter(Adapter):
    @tool(description="Count the words of a text")
    def word_count(self, text: str) -> int:
        return len(words(text))

    @tool(description="The n most frequent words of a text, with their counts")
    def top_words(self, text: str, n: int = 5) -> list[list[Any]]:
        return [[w, c] for w, c in Counter(words(text)).most_common(n)]

    @tool(description="Stream the sentences of a text one by one")
    async def sentences(self, text: str) -> AsyncIterator[str]:
        for sentence in re.split(r"(?<=[.!?])\s+", text.strip()):
            if sentence:
                yield sentence

    @tool(description="Add a document to this session's corpus; returns the corpus size in words")
    async def add_document(self, ctx: SessionContext, text: str) -> int:
        counts = Counter(await ctx.aget("corpus", {}))
        counts.update(words(text))
        await ctx.aset("corpus", dict(counts))
        return int(await ctx.aincrement("corpus_words", len(words(text))))

    @tool(description="The n most frequent words of this session's corpus")
    async def corpus_top(self, ctx: SessionContext, n: int = 5) -> list[list[Any]]:
        counts = Counter(await ctx.aget("corpus", {}))
        return [[w, c] for w, c in counts.most_common(n)]
