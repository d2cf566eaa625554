from sentinel._sse import PING, EventFramer, encode, event_name


def test_framer_joins_events_split_across_chunks():
    framer = EventFramer()
    stream = encode("message_start", {"a": 1}) + encode("content_block_delta", {"b": 2})
    out = []
    for i in range(0, len(stream), 7):
        out += framer.feed(stream[i:i + 7])
    assert out == [encode("message_start", {"a": 1}), encode("content_block_delta", {"b": 2})]
    assert framer.pending == b""


def test_framer_accepts_crlf_and_keeps_partial_event():
    framer = EventFramer()
    assert framer.feed(b"event: ping\r\ndata: {}\r\n\r\nevent: x\r\n") == [b"event: ping\ndata: {}\n\n"]
    assert framer.pending == b"event: x\n"


def test_event_name():
    assert event_name(PING) == "ping"
    assert event_name(b"data: {}\n\n") is None
