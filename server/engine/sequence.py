"""What the engine thread keeps per sequence (one choice of one request) and per slot
(one llama sequence id and the tokens its KV cells hold)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from server.engine.bans import BanTracker
from server.engine.detokenizer import TextStream
from server.engine.sampling import SeqSampler, Snapshot
from server.engine.thinking import ThinkingGate
from server.engine.types import GenerationRequest, TokenLogprob

if TYPE_CHECKING:
    from server.engine.handle import StepHandle
    from server.engine.speculation import Drafter


@dataclass(eq=False)
class Seq:
    """One choice of one request, from admission to finish."""

    request_id: int
    index: int
    request: GenerationRequest
    handle: StepHandle | None
    """None in an engine process: outputs go to the engine's `deliver` sink."""
    parent: Seq | None = None
    sampler: SeqSampler | None = None
    stream: TextStream = field(default_factory=TextStream)
    slot: Slot | None = None
    n_past: int = 0  # tokens of this sequence in the KV cache
    cached: int = 0
    generated: list[int] = field(default_factory=list)
    next_token: int = -1  # sampled, not yet decoded
    finished: bool = False
    # Banned phrases (only when the request has some): the tracker holds back text that
    # could still become one; `held` are its tokens (id, logprob) not yet handed out.
    tracker: BanTracker | None = None
    held: list[tuple[int, TokenLogprob | None]] = field(default_factory=list)
    snapshots: dict[int, Snapshot] = field(default_factory=dict)
    """The sampler's state before each held position was sampled, to rewind to."""
    banned_at: dict[int, set[int]] = field(default_factory=dict)
    rewinds: int = 0
    thinking: ThinkingGate | None = None
    forced: list[int] = field(default_factory=list)
    """Tokens to decode next without sampling (a thinking budget's close tag)."""
    first_at: float = 0.0
    """When its first token was sampled (the status page's tok/s per slot)."""
    drafter: Drafter | None = None
    """Its n-gram drafts (None: it does not speculate)."""

    @property
    def prefilling(self) -> bool:
        return self.n_past < len(self.request.prompt_tokens)


@dataclass(eq=False)
class Slot:
    """One llama sequence id: the tokens its KV cells hold, and who uses it now."""

    id: int
    tokens: list[int] = field(default_factory=list)
    seq: Seq | None = None
    last_used: float = 0.0
    shared_until: int = 0
    """Cells below this position may be shared with another slot (`seq_cp` shares cells
    in a unified KV cache), so they must never be shifted."""

    def truncate(self, n: int) -> None:
        del self.tokens[n:]
        self.shared_until = min(self.shared_until, n)


def slot_view(slot: Slot, now: float) -> dict[str, Any]:
    """One slot for the status page: how many tokens its cells hold and, while busy, what
    its request has done (never any of its text)."""
    seq = slot.seq
    if seq is None:
        return {"id": slot.id, "busy": False, "tokens": len(slot.tokens)}
    generated = len(seq.generated)
    elapsed = now - seq.first_at
    rate = (generated - 1) / elapsed if generated > 1 and elapsed > 0 else None
    return {
        "id": slot.id,
        "busy": True,
        "tokens": len(slot.tokens),
        "phase": "prefill" if seq.prefilling else "decode",
        "prompt_tokens": len(seq.request.prompt_tokens),
        "cached_tokens": seq.cached,
        "generated": generated,
        "tok_s": None if rate is None else round(rate, 1),
    }
