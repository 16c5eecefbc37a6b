"""Incremental detokenization: whole UTF-8 characters only, stop strings never emitted."""

from __future__ import annotations

import codecs


class TextStream:
    """Turns token bytes into safe text deltas.

    Bytes are buffered until they form whole UTF-8 characters. Text that could still
    turn into a stop string is held back until it is clear either way, so a stop string
    split across tokens is never sent, not even in part.
    """

    def __init__(self, stop: tuple[str, ...] = ()) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = tuple(s for s in stop if s)
        self._held = ""
        self.stopped = False
        self.matched: str | None = None
        """The stop string that was found, once `stopped`."""

    def push(self, piece: bytes) -> str:
        """Add one token's bytes; return the text that is now safe to emit."""
        text = self._held + self._decoder.decode(piece)
        if not self._stops:
            self._held = ""
            return text
        found = [(i, s) for s in self._stops if (i := text.find(s)) >= 0]
        if found:
            cut, self.matched = min(found, key=lambda f: f[0])
            self.stopped = True
            self._held = ""
            return text[:cut]
        keep = self._partial_stop_suffix(text)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        """End of generation: whatever is held back (incomplete bytes become U+FFFD)."""
        if self.stopped:
            return ""
        text = self._held + self._decoder.decode(b"", final=True)
        self._held = ""
        return text

    def _partial_stop_suffix(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        best = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:k]):
                    best = k
                    break
        return best
