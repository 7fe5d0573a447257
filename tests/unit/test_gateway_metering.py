"""Knowledge-base work is metered: the tokens the real embedding model reads for a request,
also from the thread the gateway runs it in, and nothing outside a request."""

from __future__ import annotations

import asyncio

from appliance.gateway.metering import MeteredEmbedder, metering


def test_embedded_tokens_are_counted_in_the_requests_threads():
    embedder = MeteredEmbedder(batch_size=2)
    texts = ["hello world", "the sea", "a story about the sea and its ships"]
    expected = embedder.count_tokens(texts)
    assert expected == 4 + 4 + 10  # with [CLS] and [SEP], as the model reads them

    async def request() -> int:
        with metering() as meter:
            await asyncio.to_thread(embedder.embed, texts)  # as KnowledgeService.run does
            return meter.tokens

    assert asyncio.run(request()) == expected
    embedder.embed(["outside any request"])  # no meter: nothing to count, no error


def test_long_texts_count_what_the_model_reads():
    embedder = MeteredEmbedder()
    window = embedder._model.max_seq_length
    with metering() as meter:
        embedder.embed(["word " * 5000])
    assert meter.tokens == window
