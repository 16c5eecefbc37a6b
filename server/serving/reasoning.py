"""Reasoning: a thinking model's `<think>…</think>` split from its answer.

One format per model family (the markers its template uses); the splitter reads the
output as it streams. Thinking is recognised only at the start of a reply (after
whitespace), or from the first token when the prompt itself opened the block (templates
that end the generation prompt with `<think>`), so a story that mentions a tag mid-text
is left alone. A reply that does not start with the tag costs one check per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from server.engine.thinking import ThinkingBudget
from server.engine.types import Engine
from server.serving.tools import partial_suffix
from server.templates import ChatTemplate


@dataclass(frozen=True)
class ReasoningFormat:
    open: str
    close: str


THINK = ReasoningFormat("<think>", "</think>")
# Families with other markers, recognised by their template (DeepSeek, Qwen3, GLM and
# most distills use THINK, which is also the default).
FORMATS = (
    ReasoningFormat("<thinking>", "</thinking>"),
    ReasoningFormat("[THINK]", "[/THINK]"),  # Magistral
    ReasoningFormat("<seed:think>", "</seed:think>"),  # Seed-OSS
    ReasoningFormat("◁think▷", "◁/think▷"),  # Kimi
)

# OpenRouter's effort levels as a share of max_tokens spent thinking (its documented ratios).
EFFORT_SHARE = {"xhigh": 0.95, "high": 0.8, "medium": 0.5, "low": 0.2, "minimal": 0.1}

# Within this many characters of the prompt's end (after an assistant prefill), an open
# tag with no close after it means the reply starts inside the thinking.
_TAIL = 64


def reasoning_format(template: ChatTemplate) -> ReasoningFormat:
    for fmt in FORMATS:
        if fmt.open in template.source:
            return fmt
    return THINK


def thinks(template: ChatTemplate) -> bool:
    """Whether the template knows of thinking at all (its markers, or a thinking switch)."""
    fmt = reasoning_format(template)
    return fmt.open in template.source or "enable_thinking" in template.source


def starts_inside(prompt: str, prefill: str, fmt: ReasoningFormat) -> bool:
    """Whether the prompt leaves the model inside an open thinking block."""
    at = prompt.rfind(fmt.open)
    if at < 0 or at < len(prompt) - len(prefill) - _TAIL:
        return False
    return prompt.find(fmt.close, at) < 0


@dataclass(frozen=True)
class ReasoningPlan:
    """What a request's reasoning options mean for one reply."""

    fmt: ReasoningFormat
    inside: bool  # the reply starts inside the thinking
    exclude: bool  # split it out, but do not return it
    budget: int | None  # thinking tokens allowed (None: no limit)

    def engine_budget(self, engine: Engine) -> ThinkingBudget | None:
        if self.budget is None:
            return None
        close = engine.tokenize(self.fmt.close + "\n\n", add_special=False)
        return ThinkingBudget(self.budget, self.fmt.open, self.fmt.close, tuple(close), self.inside)


def budget_for(
    enabled: bool | None, effort: str | None, max_tokens: int | None, reasoning_tokens: int | None
) -> int | None:
    """Thinking tokens allowed: 0 when thinking is off, an explicit count, or the
    effort's share of max_tokens; None for no limit."""
    if enabled is False or effort == "none":
        return 0
    if reasoning_tokens is not None:
        return reasoning_tokens
    if effort in EFFORT_SHARE and max_tokens:
        return max(1, int(max_tokens * EFFORT_SHARE[effort]))
    return None


class ReasoningSplitter:
    """Splits a streamed reply into (reasoning, content) deltas."""

    def __init__(self, fmt: ReasoningFormat, inside: bool = False) -> None:
        self.fmt = fmt
        self.state: Literal["start", "inside", "done"] = "inside" if inside else "start"
        self._buf = ""
        self._lead = True  # drop the whitespace that opens the thinking
        self._strip = False  # drop the whitespace between the close tag and the answer

    def push(self, text: str) -> tuple[str, str]:
        if self.state == "done":
            if self._strip and text:
                text = text.lstrip()
                self._strip = not text
            return "", text
        self._buf += text
        if self.state == "start":
            head = self._buf.lstrip()
            if head.startswith(self.fmt.open):
                self.state = "inside"
                self._buf = head[len(self.fmt.open) :]
            elif self.fmt.open.startswith(head):
                return "", ""  # nothing yet, or the start of the tag
            else:
                self.state, out, self._buf = "done", self._buf, ""
                return "", out
        return self._inside()

    def _inside(self) -> tuple[str, str]:
        if self._lead:
            self._buf = self._buf.lstrip()
            self._lead = not self._buf
        close = self.fmt.close
        at = self._buf.find(close)
        if at >= 0:
            reasoning, rest = self._buf[:at], self._buf[at + len(close) :]
            self.state, self._buf = "done", ""
            rest = rest.lstrip()
            self._strip = not rest
            return reasoning, rest
        keep = partial_suffix(self._buf, close)
        out = self._buf[: len(self._buf) - keep]
        self._buf = self._buf[len(out) :]
        return out, ""

    def finish(self) -> tuple[str, str]:
        """The end of the reply: what is still held back (an unclosed block is reasoning)."""
        out, self._buf = self._buf, ""
        if self.state == "inside":
            return out, ""
        return "", out
