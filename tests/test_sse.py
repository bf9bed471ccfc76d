"""SSE data lines split at line ends only, whatever the pieces and whatever the JSON holds."""

import json

import pytest

from kvbm.serving.sse import DONE, DataLines, data_of, iter_data

# Characters str.splitlines() breaks at that JSON leaves unescaped: each a token's text once.
TEXTS = ["plain", "next\u2028line", "nel\x85", "para\u2029", "é", "\u2028"]
EVENTS = [json.dumps({"choices": [{"text": t}]}, ensure_ascii=False) for t in TEXTS]


@pytest.mark.parametrize("ending", ["\n\n", "\r\n\r\n", "\r\r"])
@pytest.mark.parametrize("piece", [1, 2, 3, 7, 1000])
def test_events_survive_any_split_into_pieces(ending, piece):
    body = "".join(f"data: {e}{ending}" for e in EVENTS) + f"data: {DONE}{ending}"
    raw = body.encode()
    chunks = [raw[i : i + piece] for i in range(0, len(raw), piece)]
    assert list(iter_data(chunks)) == EVENTS + [DONE]
    assert data_of(body) == EVENTS + [DONE]
    assert [json.loads(e)["choices"][0]["text"] for e in EVENTS] == TEXTS


def test_only_data_lines_count_and_an_unterminated_last_line_is_kept():
    lines = DataLines()
    assert lines.feed(b": comment\nevent: x\ndata:no-space\nid: 3\n\ndata: last") == ["no-space"]
    assert lines.close() == ["last"] and lines.close() == []
