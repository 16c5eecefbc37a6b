"""The reasoning splitter and the thinking budget's gate, on text alone."""

from __future__ import annotations

import random

from server.engine.thinking import ThinkingBudget, ThinkingGate
from server.serving.reasoning import (
    THINK,
    ReasoningFormat,
    ReasoningSplitter,
    budget_for,
    reasoning_format,
    starts_inside,
)
from server.templates import ChatTemplate


def split(text: str, pieces: list[int], inside: bool = False) -> tuple[str, str]:
    s = ReasoningSplitter(THINK, inside)
    reasoning, content, at = "", "", 0
    for n in pieces:
        r, c = s.push(text[at : at + n])
        reasoning, content, at = reasoning + r, content + c, at + n
    r, c = s.finish()
    return reasoning + r, content + c


def test_split_whatever_the_token_boundaries() -> None:
    text = "  <think>\nI should greet.\n</think>\n\nHello there!"
    rng = random.Random(1)
    for _ in range(200):
        cuts, left = [], len(text)
        while left > 0:
            n = min(left, rng.randint(1, 6))
            cuts.append(n)
            left -= n
        assert split(text, cuts) == ("I should greet.\n", "Hello there!")


def test_no_thinking_passes_through() -> None:
    assert split("Hello <think> there", [1] * 19) == ("", "Hello <think> there")
    assert split("<thin", [5]) == ("", "<thin")  # a tag that never completed
    assert split("", []) == ("", "")


def test_started_inside_by_the_prompt() -> None:
    assert split("Let me see.</think>Yes.", [3] * 8, inside=True) == ("Let me see.", "Yes.")
    assert split("Unclosed thought", [4] * 4, inside=True) == ("Unclosed thought", "")


def test_starts_inside_reads_the_prompt_end() -> None:
    assert starts_inside("<|im_start|>assistant\n<think>\n", "", THINK)
    assert not starts_inside("<|im_start|>assistant\n<think>\n\n</think>\n\n", "", THINK)
    assert not starts_inside("<think> in a system prompt" + "x" * 500, "", THINK)


def test_formats_by_template() -> None:
    magistral = ChatTemplate("gguf", "{{ '[THINK]' }}...{{ '[/THINK]' }}")
    assert reasoning_format(magistral) == ReasoningFormat("[THINK]", "[/THINK]")
    assert reasoning_format(ChatTemplate("chatml", "plain")) == THINK


def test_budget_from_request_fields() -> None:
    assert budget_for(False, None, 100, None) == 0
    assert budget_for(None, "none", 100, None) == 0
    assert budget_for(None, None, 100, 42) == 42
    assert budget_for(None, "low", 1000, None) == 200
    assert budget_for(None, "high", None, None) is None
    assert budget_for(None, None, None, None) is None


def gate(tokens: int, inside: bool = False) -> ThinkingGate:
    return ThinkingGate(ThinkingBudget(tokens, "<think>", "</think>", (7, 8), inside))


def test_gate_forces_the_close_when_spent() -> None:
    g = gate(3)
    assert g.push("<think>") == ()
    assert [g.push(t) for t in ("a", "b")] == [(), ()]
    assert g.push("c") == (7, 8)
    assert g.state == "done" and g.push("d") == ()


def test_gate_leaves_a_closed_or_absent_thought_alone() -> None:
    g = gate(5)
    for t in ("<think>", "a", "</think>", "x", "y", "z", "w"):
        assert g.push(t) == ()
    g = gate(1)
    assert g.push("Hello") == () and g.state == "done"


def test_gate_zero_budget() -> None:
    assert gate(0, inside=True).initial() == (7, 8)
    g = gate(0)
    assert g.initial() == ()
    assert g.push("<think>") == (7, 8)
