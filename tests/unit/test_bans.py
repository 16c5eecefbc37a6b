"""The banned-phrase tracker: what it holds back, when it reports a phrase, where it rewinds."""

from __future__ import annotations

import random

import pytest

from server.engine.bans import Ban, BanList, BanTracker, Hit, check


def feed(tracker: BanTracker, pieces: list[str]) -> tuple[str, Hit | None]:
    """Push pieces until a hit; the text released so far."""
    out = b""
    for piece in pieces:
        hit = tracker.push(piece.encode())
        if hit is not None:
            return out.decode(), hit
        out += tracker.release()[1]
    return out.decode(), None


def test_a_phrase_split_over_tokens_is_held_then_reported_at_its_first_token() -> None:
    tracker = BanTracker(BanList([Ban("shivers down")]))
    released, hit = feed(tracker, ["She", " felt", " shiv", "ers", " down", " her"])
    assert released == "She felt"
    assert hit == Hit(2, "shivers down")


def test_text_that_stops_matching_is_released() -> None:
    tracker = BanTracker(BanList([Ban("shivers down")]))
    released, hit = feed(tracker, ["She", " shiv", "ers", " up", " her"])
    assert hit is None
    assert released == "She shivers up her"


def test_case_insensitive_by_default_and_sensitive_on_request() -> None:
    loose = BanTracker(BanList([Ban("elara")]))
    assert feed(loose, ["Hi", " El", "ara"])[1] == Hit(1, "elara")
    strict = BanTracker(BanList([Ban("elara", case_sensitive=True)]))
    assert feed(strict, ["Hi", " El", "ara"])[1] is None


def test_a_phrase_inside_one_token_and_the_earliest_of_overlapping_phrases() -> None:
    tracker = BanTracker(BanList([Ban("testament"), Ban("a test")]))
    assert feed(tracker, ["It", " is", " a", " testament"])[1] == Hit(2, "a test")


def test_regex_holds_partial_matches_and_reports_complete_ones() -> None:
    tracker = BanTracker(BanList([Ban(r"\bsmirk(s|ed|ing)?\b", regex=True)]))
    released, hit = feed(tracker, ["He", " smi", "rk", "ed", "."])
    assert released == "He"  # whole tokens only: " smi" began the match
    assert hit is not None and hit.token == 1


def test_rewind_forgets_the_tail_and_matching_resumes_from_there() -> None:
    tracker = BanTracker(BanList([Ban("shivers")]))
    _, hit = feed(tracker, ["A", " shiv", "ers"])
    assert hit is not None
    tracker.rewind(hit.token)
    released, hit = feed(tracker, [" chill", " ran"])
    assert hit is None
    assert released == " chill ran"  # "A" went out before the phrase began
    assert tracker.flush()[1] == b""


def test_a_multibyte_character_split_over_tokens_rewinds_to_its_first_byte() -> None:
    tracker = BanTracker(BanList([Ban("é!")]))
    raw = "é".encode()
    assert tracker.push(b"x") is None
    tracker.release()
    assert tracker.push(raw[:1]) is None
    assert tracker.push(raw[1:]) is None
    assert tracker.push(b"!") == Hit(1, "é!")


def test_many_phrases_match_like_a_loop_over_them() -> None:
    rng = random.Random(7)
    words = ["".join(rng.choice("abc ") for _ in range(rng.randint(2, 6))) for _ in range(300)]
    phrases = [w for w in dict.fromkeys(words) if w.strip()]
    tracker = BanTracker(BanList([Ban(p) for p in phrases]))
    text = "".join(rng.choice("abc ") for _ in range(400))
    pieces = [text[i : i + 3] for i in range(0, len(text), 3)]
    _, hit = feed(tracker, pieces)
    first_end = min((text.find(p) + len(p) for p in phrases if p in text), default=None)
    assert (hit is None) == (first_end is None)
    if hit is not None and first_end is not None:
        assert hit.phrase in text[:first_end]


@pytest.mark.parametrize(
    ("bans", "why"),
    [
        ([Ban("(", regex=True)], "not a valid regular expression"),
        ([Ban("a*", regex=True)], "matches the empty string"),
        ([Ban("x" * 300)], "at most 256 characters"),
        ([Ban(f"p{i}", regex=True) for i in range(65)], "at most 64 regular expressions"),
    ],
)
def test_unusable_lists_are_refused_with_a_reason(bans: list[Ban], why: str) -> None:
    reason = check(bans)
    assert reason is not None and why in reason
