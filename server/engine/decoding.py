"""Decoding one sequence: sampling each token from its logits row with the request's
own chain, then EOS, stop strings, banned phrases (holding back and rewinding), the
thinking budget and max_tokens, and finishing (the slot is freed, the outputs say why).

Every token a sequence gets goes through `sample`, one position at a time: plain
decoding and speculative verification alike, so both give exactly the same text.
"""

from __future__ import annotations

import time

from server.engine.bans import BanTracker, Hit, RegexTimeout
from server.engine.detokenizer import TextStream
from server.engine.llama import LlamaModel
from server.engine.sampling import GrammarDeadEnd, NoTokenLeft, SeqSampler
from server.engine.sequence import Seq
from server.engine.thinking import ThinkingGate
from server.engine.types import FinishReason, SeqOutput, TokenLogprob

# A choice that keeps forming banned phrases ends (cleanly, with a note) after this many
# rewinds, or this many bans at one position: it never loops.
MAX_REWINDS = 256
MAX_BANS_AT_POSITION = 64


class Decoding:
    def __init__(self, model: LlamaModel, stats: dict[str, int]) -> None:
        self.model = model
        self.stats = stats

    def start(self, seq: Seq) -> None:
        """A sequence just placed: its sampler chain, stop-string stream, ban tracker and
        thinking budget."""
        seed = seq.request.params.seed
        seq.sampler = SeqSampler(
            self.model, seq.request.params, None if seed is None else seed + seq.index
        )
        seq.stream = TextStream(seq.request.stop)
        if seq.request.bans is not None:
            seq.tracker = BanTracker(seq.request.bans)
        if seq.request.thinking is not None:
            seq.thinking = ThinkingGate(seq.request.thinking)
            seq.forced = list(seq.thinking.initial())

    def sample(self, seq: Seq, idx: int) -> SeqOutput | None:
        assert seq.sampler is not None
        req = seq.request
        position = len(seq.generated)
        banned = seq.banned_at.get(position, ())
        if seq.tracker is not None:
            seq.snapshots[position] = seq.sampler.snapshot()
        try:
            if seq.forced and not seq.sampler.allows(seq.forced[0]):
                seq.forced.clear()  # a grammar that does not allow the close tag wins
            if seq.forced:
                token, logprob = seq.forced.pop(0), None
                seq.sampler.accept(token)
            else:
                token, logprob = seq.sampler.sample(idx, position, banned)
        except GrammarDeadEnd as exc:
            # A finished document whose end was banned ends here; otherwise the bans
            # excluded everything the grammar allows, which no token can satisfy.
            if exc.complete:
                return self.end(seq, "stop")
            if banned:
                return self.give_up(seq, position, "every token the grammar allows")
            return self.finish(seq, "error", str(exc))
        except NoTokenLeft:
            return self.give_up(seq, position, "every token")
        self.stats["tokens"] += 1
        if not seq.generated:
            seq.first_at = time.monotonic()
        seq.generated.append(token)
        if seq.drafter is not None:
            seq.drafter.index.push(token)
        seq.next_token = token
        eog = self.model.is_eog(token) or token in req.stop_token_ids
        if eog and not req.params.ignore_eos:
            o = self.end(seq, "stop")
            o.token_ids.append(token)
            if logprob is not None:
                o.logprobs = [*(o.logprobs or []), logprob]
            return o
        piece = self.model.piece(token, req.render_special)
        if seq.thinking is not None and seq.thinking.state != "done":
            seq.forced.extend(seq.thinking.push(piece.decode("utf-8", "ignore")))
        tokens: list[int] = [token]
        logprobs: list[TokenLogprob] | None = [logprob] if logprob is not None else None
        if seq.tracker is None:
            text = seq.stream.push(piece)
        else:
            seq.held.append((token, logprob))
            try:
                hit = seq.tracker.push(piece)
                if hit is not None:
                    return self.rewind(seq, hit)
                n, data = seq.tracker.release()
            except RegexTimeout as exc:
                return self.finish(seq, "error", str(exc))
            tokens, logprobs = self.take_held(seq, n)
            text = seq.stream.push(data) if n else ""
        finish: FinishReason | None = None
        if seq.stream.stopped:
            finish = "stop"
        elif len(seq.generated) >= req.max_tokens or seq.n_past + 1 >= self.model.n_ctx:
            finish = "length"
        if finish is not None:
            o = self.end(seq, finish)
            o.text = text + o.text
            o.token_ids = tokens + o.token_ids
            if logprobs is not None or o.logprobs is not None:
                o.logprobs = (logprobs or []) + (o.logprobs or [])
            return o
        return SeqOutput(
            index=seq.index,
            text=text,
            token_ids=tokens,
            logprobs=logprobs,
            prompt_tokens=len(req.prompt_tokens),
            cached_tokens=seq.cached,
            completion_tokens=len(seq.generated),
        )

    def take_held(self, seq: Seq, n: int) -> tuple[list[int], list[TokenLogprob] | None]:
        """The first `n` held tokens, now released: their ids and logprobs."""
        taken, seq.held = seq.held[:n], seq.held[n:]
        assert seq.tracker is not None
        for position in [p for p in seq.snapshots if p < seq.tracker.released]:
            seq.snapshots.pop(position).free()
        logprobs = [lp for _, lp in taken if lp is not None]
        return [t for t, _ in taken], (logprobs or None)

    def end(self, seq: Seq, reason: FinishReason, note: str | None = None) -> SeqOutput:
        """Finish normally: what the ban tracker still holds goes out first."""
        tokens: list[int] = []
        logprobs: list[TokenLogprob] | None = None
        text = ""
        if seq.tracker is not None:
            n, data = seq.tracker.flush()
            tokens, logprobs = self.take_held(seq, n)
            if not seq.stream.stopped:
                text = seq.stream.push(data)
        o = self.finish(seq, reason, note=note)
        o.text = text + o.text
        o.token_ids = tokens
        o.logprobs = logprobs
        return o

    def rewind(self, seq: Seq, hit: Hit) -> SeqOutput | None:
        """A banned phrase formed: go back to the token where it began, ban that token
        there, and sample again (the next step re-decodes the token before it)."""
        assert seq.tracker is not None and seq.sampler is not None and seq.slot is not None
        at = hit.token
        seq.rewinds += 1
        bans = seq.banned_at.setdefault(at, set())
        bans.add(seq.generated[at])
        if seq.rewinds > MAX_REWINDS or len(bans) > MAX_BANS_AT_POSITION:
            return self.give_up(seq, at, repr(hit.phrase))
        n_prompt = len(seq.request.prompt_tokens)
        pos = n_prompt + at - 1  # the cell whose logits sample position `at`
        if not self.model.seq_rm(seq.slot.id, pos, -1):
            return self.give_up(seq, at, repr(hit.phrase))  # this memory cannot cut
        seq.slot.truncate(pos)
        for position in [p for p in seq.banned_at if p > at]:
            del seq.banned_at[position]
        seq.sampler.restore(seq.snapshots.pop(at))
        for position in [p for p in seq.snapshots if p > at]:
            seq.snapshots.pop(position).free()
        del seq.held[at - seq.tracker.released :]
        seq.tracker.rewind(at)
        seq.next_token = seq.generated[at - 1] if at > 0 else seq.request.prompt_tokens[-1]
        del seq.generated[at:]
        if seq.drafter is not None:
            seq.drafter.index.truncate(n_prompt + at)
        seq.n_past = pos
        self.stats["ban_rewinds"] += 1
        return None

    def give_up(self, seq: Seq, at: int, what: str) -> SeqOutput:
        """End a choice before position `at`, where a banned phrase cannot be avoided."""
        assert seq.tracker is not None
        del seq.held[at - seq.tracker.released :]
        seq.tracker.rewind(at)
        del seq.generated[at:]
        if seq.drafter is not None:
            seq.drafter.index.truncate(len(seq.request.prompt_tokens) + at)
        note = f"banned_string: could not avoid {what} after {seq.rewinds} rewinds"
        return self.end(seq, "stop", note)

    def finish(
        self,
        seq: Seq,
        reason: FinishReason,
        error: str | None = None,
        note: str | None = None,
    ) -> SeqOutput:
        seq.finished = True  # the scheduler drops it from its lists
        tail = seq.stream.flush() if reason in ("stop", "length") else ""
        if seq.slot is not None:
            seq.slot.seq = None
            seq.slot.last_used = time.monotonic()
            seq.slot = None
        for snap in seq.snapshots.values():
            snap.free()
        seq.snapshots.clear()
        if seq.sampler is not None:
            seq.sampler.close()
        return SeqOutput(
            index=seq.index,
            text=tail,
            finish_reason=reason,
            error=error,
            note=note,
            prompt_tokens=len(seq.request.prompt_tokens),
            cached_tokens=seq.cached,
            stop_string=seq.stream.matched,
            completion_tokens=len(seq.generated),
            drafted=seq.drafter.drafted if seq.drafter is not None else 0,
            accepted=seq.drafter.accepted if seq.drafter is not None else 0,
        )
