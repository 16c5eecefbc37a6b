"""A thinking budget: once a model has thought for N tokens, its close tag is forced.

Reasoning models write `<think>…</think>` (or their family's markers) before the
answer; some templates open the tag in the prompt, so the output starts inside it. The
gate watches the text as it is generated: thinking counts only when the output starts
with the open tag (or the prompt opened it), and ends at the close tag. When the budget
is spent first, the close tag's tokens are handed back to be decoded next, as if
sampled, and the model goes on to the answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class ThinkingBudget:
    tokens: int
    """Tokens of thinking allowed; 0 closes the thinking at once."""
    open_tag: str
    close_tag: str
    close_ids: tuple[int, ...]
    """The close tag (with the newline that follows it) as tokens, to force."""
    inside: bool = False
    """The prompt ends inside an opened thinking block."""


class ThinkingGate:
    """Per sequence: are we thinking, for how long, and must it end now."""

    def __init__(self, budget: ThinkingBudget) -> None:
        self.budget = budget
        self.state: Literal["start", "inside", "done"] = "inside" if budget.inside else "start"
        self.count = 0
        self._text = ""

    def initial(self) -> tuple[int, ...]:
        """Tokens to force before anything is sampled (a zero budget inside a block)."""
        if self.state == "inside" and self.budget.tokens <= 0:
            self.state = "done"
            return self.budget.close_ids
        return ()

    def push(self, piece: str) -> tuple[int, ...]:
        """One generated token's text; the tokens to force next (usually none)."""
        if self.state == "done":
            return ()
        b = self.budget
        if self.state == "start":
            self._text += piece
            head = self._text.lstrip()
            if head.startswith(b.open_tag):
                self.state = "inside"
                self._text = head[len(b.open_tag) :]
                if b.tokens <= 0 and b.close_tag not in self._text:
                    self.state = "done"
                    return b.close_ids
            elif not b.open_tag.startswith(head):
                self.state = "done"  # no thinking in this reply: nothing more to watch
                self._text = ""
            return ()
        self.count += 1
        self._text = (self._text + piece)[-4 * len(b.close_tag) :]
        if b.close_tag in self._text:
            self.state = "done"
            return ()
        if self.count >= b.tokens:
            self.state = "done"
            return b.close_ids
        return ()
