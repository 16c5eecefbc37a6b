"""OpenRouter's `middle-out` transform: drop or shorten the middle of a chat to fit.

The start (system prompt, scene setting) and the end (the latest turns) of a chat matter
most, so messages are removed from the middle outwards until the prompt fits; if the
first and last messages alone are still too long, the middle of the longest one is cut.
As on OpenRouter it is on by default (`transforms` absent, or listing "middle-out");
`transforms: []` turns it off, and a prompt that does not fit is then a 400.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from server.protocol.chat import ChatMessage, TextPart

ELLIPSIS = "\n…\n"


def middle_out_enabled(transforms: list[str] | None) -> bool:
    return transforms is None or "middle-out" in transforms


def middle_out_tokens(tokens: list[int], budget: int) -> list[int]:
    """A raw prompt's tokens with the middle removed, keeping `budget` of them."""
    if len(tokens) <= budget:
        return tokens
    head = budget // 2
    return tokens[:head] + tokens[len(tokens) - (budget - head) :]


def _middle_order(n: int) -> list[int]:
    """Indexes 1..n-2 ordered from the middle outwards (first and last are kept)."""
    inner = list(range(1, n - 1))
    mid = (n - 1) / 2
    return sorted(inner, key=lambda i: (abs(i - mid), i))


def _smallest(lo: int, hi: int, ok: Callable[[int], bool]) -> int | None:
    """The smallest k in [lo, hi] with ok(k) true, for a monotone ok; None if none."""
    if not ok(hi):
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def middle_out(
    messages: Sequence[ChatMessage], fits: Callable[[list[ChatMessage]], bool]
) -> list[ChatMessage] | None:
    """The messages with as little removed from the middle as makes `fits` true.

    None when even the shortened first and last messages do not fit.
    """
    order = _middle_order(len(messages))

    def without(k: int) -> list[ChatMessage]:
        dropped = set(order[:k])
        return [m for i, m in enumerate(messages) if i not in dropped]

    k = _smallest(0, len(order), lambda k: fits(without(k)))
    if k is not None:
        return without(k)
    kept = without(len(order))
    longest = max(range(len(kept)), key=lambda i: len(_text(kept[i])))
    text = _text(kept[longest])

    def cut(n: int) -> list[ChatMessage]:
        """Remove n characters from the middle of the longest message."""
        head = (len(text) - n) // 2
        shortened = text[:head] + ELLIPSIS + text[head + n :] if n else text
        out = list(kept)
        out[longest] = kept[longest].model_copy(update={"content": shortened})
        return out

    n = _smallest(0, len(text), lambda n: fits(cut(n)))
    return None if n is None else cut(n)


def _text(message: ChatMessage) -> str:
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.text for p in content if isinstance(p, TextPart))
