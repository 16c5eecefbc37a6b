from server.engine.detokenizer import TextStream


def test_multibyte_character_split_across_tokens() -> None:
    s = TextStream()
    data = "héllo 🌊".encode()
    out = [s.push(data[i : i + 1]) for i in range(len(data))]
    assert "".join(out) + s.flush() == "héllo 🌊"
    assert all("\ufffd" not in o for o in out)


def test_stop_string_split_across_tokens_is_never_emitted() -> None:
    s = TextStream(("STOP",))
    out = [s.push(p.encode()) for p in ["Hello S", "T", "OP and more"]]
    assert "".join(out) == "Hello "
    assert s.stopped
    assert s.flush() == ""


def test_held_text_released_when_not_a_stop() -> None:
    s = TextStream(("STOP",))
    assert s.push(b"a ST") == "a "
    assert s.push(b"x") == "STx"
    assert not s.stopped


def test_earliest_stop_wins() -> None:
    s = TextStream(("world", "lo"))
    assert s.push(b"hello world") == "hel"


def test_flush_returns_held_partial_stop_at_end() -> None:
    s = TextStream(("STOP",))
    assert s.push(b"abc ST") == "abc "
    assert s.flush() == "ST"
