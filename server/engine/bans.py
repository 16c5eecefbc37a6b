"""Banned phrases: notice one as it forms, so the engine can rewind and resample.

A `BanList` is compiled once per distinct list (and cached): plain phrases go into an
Aho-Corasick automaton over characters (one for case-insensitive phrases, fed lowercase
text, one for case-sensitive ones), regular expressions are compiled with the `regex`
module, whose partial matching says when text could still become a match.

A `BanTracker` follows one sequence token by token. It holds back every token whose text
could still be the start of a banned phrase (the automaton's depth and the earliest
partial regex match say how far back that is), releases the rest, and reports a `Hit`
with the token to rewind to when a phrase completes. Text is only released at token
boundaries that end a whole UTF-8 character, so a rewind never touches text a client saw.
The per-token cost is one automaton step per character, whatever the list's length.
"""

from __future__ import annotations

import bisect
import codecs
import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import regex

# Bounds on what a request (plus its model's list) may ban, checked before compiling.
MAX_PHRASES = 16_384
MAX_PHRASE_CHARS = 256
MAX_REGEXES = 64
MAX_REGEX_CHARS = 512
# Regular expressions are searched in the last this many characters; a longer match is
# not seen, and text further back is never held for a partial one.
REGEX_WINDOW = 512
# A pattern that backtracks catastrophically ends the choice instead of the server.
REGEX_TIMEOUT_S = 0.01
_SHIFT = 21  # bits of a code point; transitions are keyed by state << _SHIFT | ord(ch)


@dataclass(frozen=True)
class Ban:
    """One banned phrase: plain text (matched anywhere) or a regular expression."""

    text: str
    regex: bool = False
    case_sensitive: bool = False


@dataclass(frozen=True)
class Hit:
    """A banned phrase formed: drop tokens from `token` on and ban that token there."""

    token: int
    phrase: str


class RegexTimeout(Exception):
    """A banned pattern took too long on this text."""


def _fold(text: str) -> str:
    """Lowercase character by character, so positions stay the same."""
    return "".join(c if len(low := c.lower()) != 1 else low for c in text)


class _Automaton:
    """Aho-Corasick over characters: goto/fail with, per state, the longest phrase ending
    there (0: none) and the state's depth (the longest suffix that starts a phrase)."""

    def __init__(self, phrases: Iterable[str]) -> None:
        self.goto: dict[int, int] = {}
        self.depth: list[int] = [0]
        self.hit: list[int] = [0]
        self.label: list[str] = [""]
        children: list[list[int]] = [[]]
        for phrase in phrases:
            s = 0
            for ch in phrase:
                key = s << _SHIFT | ord(ch)
                nxt = self.goto.get(key)
                if nxt is None:
                    nxt = len(self.depth)
                    self.goto[key] = nxt
                    self.depth.append(self.depth[s] + 1)
                    self.hit.append(0)
                    self.label.append("")
                    children.append([])
                    children[s].append(nxt)
                s = nxt
            if s and self.hit[s] == 0:
                self.hit[s] = len(phrase)
                self.label[s] = phrase
        # Breadth first: a state's failure link points at a shallower state.
        self.fail = [0] * len(self.depth)
        edges = {child: key & ((1 << _SHIFT) - 1) for key, child in self.goto.items()}
        queue = list(children[0])
        for s in queue:
            for child in children[s]:
                code = edges[child]
                f = self.fail[s]
                while True:
                    nxt = self.goto.get(f << _SHIFT | code)
                    if nxt is not None and nxt != child:
                        self.fail[child] = nxt
                        break
                    if f == 0:
                        break
                    f = self.fail[f]
                fc = self.fail[child]
                if self.hit[fc] > self.hit[child]:
                    self.hit[child], self.label[child] = self.hit[fc], self.label[fc]
                queue.append(child)

    def step(self, s: int, ch: str) -> int:
        code = ord(ch)
        goto, fail = self.goto, self.fail
        while True:
            nxt = goto.get(s << _SHIFT | code)
            if nxt is not None:
                return nxt
            if s == 0:
                return 0
            s = fail[s]


class BanList:
    """A compiled list of banned phrases, shared by every sequence that uses it."""

    def __init__(self, bans: Sequence[Ban]) -> None:
        self.source = tuple(bans)
        plain = [b for b in bans if not b.regex and b.text]
        folded = {_fold(b.text) for b in plain if not b.case_sensitive}
        exact = {b.text for b in plain if b.case_sensitive}
        self.folded = _Automaton(sorted(folded)) if folded else None
        self.exact = _Automaton(sorted(exact)) if exact else None
        self.patterns: list[tuple[Any, str]] = []
        for b in bans:
            if b.regex:
                flags = 0 if b.case_sensitive else regex.IGNORECASE
                self.patterns.append((regex.compile(b.text, flags), b.text))
        self.size = len(folded) + len(exact) + len(self.patterns)

    def __reduce__(self) -> tuple[Any, tuple[tuple[Ban, ...]]]:
        # Sent to an engine process as its phrases, compiled there (and cached there).
        return compile_bans, (self.source,)


def check(bans: Sequence[Ban]) -> str | None:
    """Why this list cannot be used (too long, a phrase too long, a bad pattern), or None."""
    regexes = [b for b in bans if b.regex]
    if len(bans) - len(regexes) > MAX_PHRASES:
        return f"at most {MAX_PHRASES} phrases"
    if len(regexes) > MAX_REGEXES:
        return f"at most {MAX_REGEXES} regular expressions"
    for b in bans:
        limit = MAX_REGEX_CHARS if b.regex else MAX_PHRASE_CHARS
        if len(b.text) > limit:
            return f"a {'pattern' if b.regex else 'phrase'} may be at most {limit} characters"
        if b.regex:
            try:
                compiled = regex.compile(b.text)
            except (regex.error, OverflowError, RecursionError) as exc:
                return f"{b.text[:40]!r} is not a valid regular expression: {exc}"
            if compiled.search("", partial=False) is not None:
                return f"{b.text[:40]!r} matches the empty string"
    return None


@functools.lru_cache(maxsize=8)
def compile_bans(bans: tuple[Ban, ...]) -> BanList:
    """The compiled list (cached: frontends send the same list with every request)."""
    return BanList(bans)


class BanTracker:
    """One sequence's generated text, as far as banned phrases are concerned."""

    def __init__(self, bans: BanList) -> None:
        self.bans = bans
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pieces: list[bytes] = []
        self._texts: list[str] = []
        self._ends: list[int] = []  # characters of text after each token
        self._clean: list[bool] = []  # no partial UTF-8 character after each token
        self._states: list[tuple[int, int]] = []
        self._state = (0, 0)
        self._window = ""  # the last REGEX_WINDOW characters, for the patterns
        self.released = 0  # tokens whose text is final (handed on)

    @property
    def length(self) -> int:
        return self._ends[-1] if self._ends else 0

    def push(self, piece: bytes) -> Hit | None:
        """Add the next token's bytes; a Hit when a banned phrase is now complete."""
        text = self._decoder.decode(piece)
        start = self.length
        index = len(self._ends)
        self._pieces.append(piece)
        self._texts.append(text)
        self._ends.append(start + len(text))
        self._clean.append(not self._decoder.getstate()[0])
        s_fold, s_exact = self._state
        folded, exact = self.bans.folded, self.bans.exact
        hit_at, phrase = -1, ""
        pos = start
        for ch in text:
            if folded is not None:
                low = ch.lower()
                s_fold = folded.step(s_fold, low if len(low) == 1 else ch)
                if folded.hit[s_fold]:
                    hit_at, phrase = pos - folded.hit[s_fold] + 1, folded.label[s_fold]
                    break
            if exact is not None:
                s_exact = exact.step(s_exact, ch)
                if exact.hit[s_exact]:
                    hit_at, phrase = pos - exact.hit[s_exact] + 1, exact.label[s_exact]
                    break
            pos += 1
        self._state = (s_fold, s_exact)
        self._states.append(self._state)
        if hit_at < 0 and self.bans.patterns:
            self._window = (self._window + text)[-REGEX_WINDOW:]
            hit_at, phrase = self._search_patterns()
        if hit_at >= 0:
            return Hit(self._token_at(hit_at, index), phrase)
        return None

    def _search_patterns(self) -> tuple[int, str]:
        """A complete match of a pattern (its start), else (-1, "")."""
        offset = self.length - len(self._window)
        for pattern, source in self.bans.patterns:
            try:
                m = pattern.search(self._window, timeout=REGEX_TIMEOUT_S)
            except TimeoutError as exc:
                raise RegexTimeout(f"the banned pattern {source[:40]!r} took too long") from exc
            if m is not None and m.end() > m.start():
                return offset + m.start(), source
        return -1, ""

    def _hold_from(self) -> int:
        """The first character that could still belong to a banned phrase."""
        end = self.length
        hold = end
        s_fold, s_exact = self._state
        if self.bans.folded is not None:
            hold = min(hold, end - self.bans.folded.depth[s_fold])
        if self.bans.exact is not None:
            hold = min(hold, end - self.bans.exact.depth[s_exact])
        if self.bans.patterns:
            offset = end - len(self._window)
            for pattern, source in self.bans.patterns:
                try:
                    m = pattern.search(self._window, partial=True, timeout=REGEX_TIMEOUT_S)
                except TimeoutError as exc:
                    raise RegexTimeout(f"the banned pattern {source[:40]!r} took too long") from exc
                if m is not None and m.partial:
                    hold = min(hold, offset + m.start())
        return hold

    def _token_at(self, char: int, newest: int) -> int:
        """The token holding character `char`, moved back to a whole-character boundary."""
        token = min(bisect.bisect_right(self._ends, char), newest)
        while token > self.released and token > 0 and not self._clean[token - 1]:
            token -= 1
        return max(token, self.released)

    def release(self) -> tuple[int, bytes]:
        """Tokens (a count) whose text can no longer be part of a banned phrase, and
        their bytes; they are final from now on."""
        hold = self._hold_from()
        first = self.released
        n = first
        while n < len(self._ends) and self._ends[n] <= hold:
            n += 1
        while n > first and not self._clean[n - 1]:
            n -= 1
        self.released = n
        return n - first, b"".join(self._pieces[first:n])

    def flush(self) -> tuple[int, bytes]:
        """The end of the sequence: everything still held (no phrase is complete in it)."""
        first = self.released
        self.released = len(self._ends)
        return self.released - first, b"".join(self._pieces[first:])

    def rewind(self, token: int) -> None:
        """Forget tokens from `token` on (never one already released)."""
        assert self.released <= token <= len(self._ends)
        del self._pieces[token:]
        del self._texts[token:]
        del self._ends[token:]
        del self._clean[token:]
        del self._states[token:]
        self._state = self._states[-1] if self._states else (0, 0)
        self._decoder.reset()
        if self.bans.patterns:
            parts: list[str] = []
            size = 0
            for text in reversed(self._texts):
                if size >= REGEX_WINDOW:
                    break
                parts.append(text)
                size += len(text)
            self._window = "".join(reversed(parts))[-REGEX_WINDOW:]
