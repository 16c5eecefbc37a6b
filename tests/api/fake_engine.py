"""A fake engine with the real interface: characters are tokens, the reply is scripted."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from server.engine.detokenizer import TextStream
from server.engine.types import GenerationRequest, ModelInfo, SeqOutput
from server.errors import QueueFullError

REPLY = "Hello there, friend. How are you today?"


class FakeHandle:
    def __init__(self, engine: FakeEngine, request: GenerationRequest) -> None:
        self.engine = engine
        self.request = request
        self.cancelled = False

    async def _run(self) -> AsyncIterator[list[SeqOutput]]:
        req = self.request
        streams = [TextStream(req.stop) for _ in range(req.n)]
        reply = self.engine.reply
        cached = self.engine.lookup(req.prompt_tokens)
        try:
            if req.announce:  # admitted: prompt and cached counts first, as the real engine
                yield [
                    SeqOutput(index=i, prompt_tokens=len(req.prompt_tokens)) for i in range(req.n)
                ]
            for step in range(len(reply) + 1):
                await asyncio.sleep(self.engine.delay)
                outs = []
                for i, s in enumerate(streams):
                    if s.stopped:
                        continue
                    base = dict(
                        index=i,
                        prompt_tokens=len(req.prompt_tokens),
                        cached_tokens=cached,
                        completion_tokens=step + 1,
                    )
                    if self.engine.fail_at is not None and step == self.engine.fail_at:
                        outs.append(SeqOutput(finish_reason="error", error="boom", **base))
                        s.stopped = True
                        continue
                    if step == len(reply):
                        outs.append(SeqOutput(text=s.flush(), finish_reason="stop", **base))
                        s.stopped = True
                        continue
                    text = s.push(reply[step].encode())
                    reason = (
                        "stop" if s.stopped else ("length" if step + 1 >= req.max_tokens else None)
                    )
                    if reason == "length":
                        text += s.flush()
                        s.stopped = True
                    outs.append(
                        SeqOutput(
                            text=text,
                            token_ids=[ord(reply[step])],
                            finish_reason=reason,
                            stop_string=s.matched,
                            **base,
                        )
                    )
                if outs:
                    yield outs
                if all(s.stopped for s in streams):
                    return
        finally:
            self.engine.active -= 1

    def __aiter__(self) -> AsyncIterator[list[SeqOutput]]:
        return self._run()

    def cancel(self) -> None:
        self.cancelled = True


class FakeEngine:
    def __init__(self, n_ctx: int = 256, max_queue: int = 100) -> None:
        self.info = ModelInfo(
            n_ctx=n_ctx, n_ctx_train=n_ctx, n_vocab=1000, bos_token="<s>", eos_token="</s>",
            add_bos=True, chat_template=None, description="fake", size_bytes=0, n_params=0,
            gpu_offload=False, slots=4, bos_id=0,
        )  # fmt: skip
        self.requests: list[GenerationRequest] = []
        self.handles: list[FakeHandle] = []
        self.reply = REPLY
        self.delay = 0.0
        self.fail_at: int | None = None
        self.max_queue = max_queue
        self.active = 0
        self.closed = False
        self.last_prompt: list[int] = []

    def lookup(self, prompt: list[int]) -> int:
        """A one-entry prompt cache: the tokens shared with the previous prompt."""
        shared = 0
        for a, b in zip(prompt, self.last_prompt, strict=False):
            if a != b:
                break
            shared += 1
        self.last_prompt = list(prompt)
        return shared

    def tokenize(self, text: str, *, add_special: bool) -> list[int]:
        if text in ("<|im_end|>", "<|im_start|>"):
            return [1]
        toks = [ord(c) % 1000 for c in text]
        return ([0] if add_special else []) + toks

    def token_text(self, token_id: int) -> str:
        return "<|im_end|>" if token_id == 1 else chr(token_id)

    def grammar_error(self, grammar: str) -> str | None:
        return None if "root" in grammar else "no root rule"

    def submit(self, request: GenerationRequest) -> FakeHandle:
        if self.active >= self.max_queue:
            raise QueueFullError("queue full", headers={"Retry-After": "1"})
        self.requests.append(request)
        self.active += 1
        handle = FakeHandle(self, request)
        self.handles.append(handle)
        return handle

    def health(self) -> dict[str, Any]:
        busy = min(self.active, 4)
        return {
            "status": "ok",
            "slots": 4,
            "slots_busy": busy,
            "queued": max(self.active - 4, 0),
            "n_ctx": self.info.n_ctx,
            "slot_list": [
                {"id": i, "busy": i < busy, "tokens": 32 if i < busy else 0} for i in range(4)
            ],
        }

    @property
    def busy(self) -> bool:
        return self.active > 0

    def close(self) -> None:
        self.closed = True


class FakeEmbedder:
    """A fake embedding model: a text's vector counts its letters (a..p), normalised; a
    reranker's score is the number of query words the document shares, minus 1."""

    def __init__(self, n_ctx: int = 64, pooling: str = "mean") -> None:
        self.info = ModelInfo(
            n_ctx=n_ctx, n_ctx_train=n_ctx, n_vocab=1000, bos_token="<s>", eos_token="</s>",
            add_bos=False, chat_template=None, description="fake-embed", size_bytes=0,
            n_params=0, gpu_offload=False, slots=8, pooling=pooling,
            n_embd=1 if pooling == "rank" else 16,
        )  # fmt: skip
        self.batches: list[list[list[int]]] = []
        self.delay = 0.0
        self.active = 0
        self.closed = False

    def tokenize(self, text: str, *, add_special: bool) -> list[int]:
        return [ord(c) % 1000 for c in text]

    def token_text(self, token_id: int) -> str:
        return chr(token_id)

    def grammar_error(self, grammar: str) -> str | None:
        return "an embedding model does not generate text"

    def submit(self, request: GenerationRequest) -> FakeHandle:
        raise AssertionError("an embedding model got a generation request")

    def pair_tokens(self, query: str, document: str) -> list[int]:
        pieces = (
            self.tokenize(query, add_special=False),
            [0],
            self.tokenize(document, add_special=False),
        )
        return [t for piece in pieces for t in piece]

    async def embed(self, inputs: list[list[int]]) -> list[Any]:
        import numpy as np

        self.batches.append(inputs)
        self.active += 1
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.active -= 1
        out = []
        for tokens in inputs:
            if self.info.pooling == "rank":
                query, _, doc = "".join(map(chr, tokens)).partition("\0")
                shared = set(query.lower().split()) & set(doc.lower().split())
                out.append(np.array([len(shared) - 1.0], dtype=np.float32))
                continue
            v = np.zeros(16, dtype=np.float32)
            for t in tokens:
                c = chr(t).lower()
                if "a" <= c <= "p":
                    v[ord(c) - ord("a")] += 1
            v[15] += 0.5  # never a zero vector
            out.append(v / np.linalg.norm(v))
        return out

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "slots": 8, "slots_busy": min(self.active, 8)}

    @property
    def busy(self) -> bool:
        return self.active > 0

    def close(self) -> None:
        self.closed = True
