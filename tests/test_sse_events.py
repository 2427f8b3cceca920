"""SSEEvents: a response body cut anywhere comes out as whole SSE events, every byte once."""

from __future__ import annotations

from collections.abc import Callable

from hypothesis import given
from hypothesis import strategies as st

from worker_vllm.jobs.vllm_app import SSEEvents, parse_sse


class _Body:
    """A body that pushes the given chunks when asked (stands in for a relayed body)."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    def push_to(self, put: Callable[[bytes], None], end: Callable[[BaseException | None], None]
                ) -> None:
        for chunk in self.chunks:
            put(chunk)
        end(None)

    async def aclose(self) -> None:
        pass


def _items(chunks: list[bytes]) -> list[str]:
    items: list[str] = []
    SSEEvents(_Body(chunks)).push_to(items.append, lambda error: None)  # type: ignore[arg-type]
    return items


EVENT = r'data: \{"i": [1-9][0-9]{0,3}, "t": "[a-z é]{0,8}"\}'
EVENTS = st.lists(st.from_regex(EVENT, fullmatch=True).map(lambda e: e + "\n\n"),
                  min_size=1, max_size=12)


@given(EVENTS, st.lists(st.integers(min_value=0, max_value=400), max_size=10))
def test_a_body_cut_anywhere_gives_whole_events_and_every_byte_once(events, cuts) -> None:
    # Cut between characters (vLLM sends whole strings: each chunk is valid UTF-8).
    text = "".join(events)
    points = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    chunks = [text[a:b].encode() for a, b in zip(points, points[1:], strict=False)]
    items = _items(chunks)
    assert "".join(items) == text
    assert all(item.endswith("\n\n") for item in items)
    assert [p["i"] for item in items for p in parse_sse(item)] == [
        int(e.split('"i": ')[1].split(",")[0]) for e in events]


def test_whole_event_chunks_pass_as_they_are_and_done_parses_to_nothing() -> None:
    chunks = [b'data: {"a": 1}\n\n', b'data: {"a": 2}\n\ndata: {"a": 3}\n\n', b"data: [DONE]\n\n"]
    items = _items(chunks)
    assert items == [c.decode() for c in chunks]
    assert [parse_sse(i) for i in items] == [[{"a": 1}], [{"a": 2}, {"a": 3}], []]


def test_an_unterminated_last_event_is_closed() -> None:
    assert _items([b'data: {"a": 1}\n\ndata: {"a"', b": 2}"]) == [
        'data: {"a": 1}\n\n', 'data: {"a": 2}\n\n']
