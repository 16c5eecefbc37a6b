"""The engine's small interface: what goes in (a request), what comes out (step outputs)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
import numpy.typing as npt

from server.engine.layout import DeviceShare

if TYPE_CHECKING:
    from server.engine.bans import BanList
    from server.engine.thinking import ThinkingBudget

FinishReason = Literal["stop", "length", "cancelled", "error"]


@dataclass(frozen=True)
class SamplingParams:
    """Everything that decides how the next token is picked. Neutral values disable a stage."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    top_a: float = 0.0
    typical_p: float = 1.0
    top_n_sigma: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    penalty_last_n: int = 64
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_penalty_last_n: int = -1
    dry_sequence_breakers: tuple[str, ...] = ("\n", ":", '"', "*")
    xtc_threshold: float = 0.1
    xtc_probability: float = 0.0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    mirostat: int = 0
    dynatemp_range: float = 0.0
    dynatemp_exponent: float = 1.0
    min_tokens: int = 0
    ignore_eos: bool = False
    grammar: str | None = None
    top_logprobs: int | None = None
    """None: no logprobs. 0..20: the sampled token's logprob plus this many alternatives."""
    sampler_order: tuple[str, ...] | None = None
    tfs: float = 1.0
    smoothing_factor: float = 0.0
    smoothing_curve: float = 1.0
    adaptive_target: float = -1.0
    """adaptive-p's target probability; negative: off (the final pick is a plain draw)."""
    adaptive_decay: float = 0.9

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass(frozen=True)
class GenerationRequest:
    """One request to the engine: a tokenized prompt, n choices, when to stop."""

    prompt_tokens: list[int]
    params: SamplingParams
    max_tokens: int
    stop: tuple[str, ...] = ()
    stop_token_ids: frozenset[int] = frozenset()
    n: int = 1
    render_special: bool = False
    """Write control tokens (e.g. Mistral's `[TOOL_CALLS]`) into the text, for tool parsing."""
    bans: BanList | None = None
    """Phrases the text must never contain (rewound and resampled when one forms)."""
    thinking: ThinkingBudget | None = None
    """Close the model's thinking once it has used this many tokens."""
    announce: bool = False
    """Send an empty output (prompt and cached counts) when a slot is found, before the
    prefill: Anthropic's message_start carries those counts."""
    speculative: bool | None = None
    """False: never draft; True: draft whenever there is a match; None: the model's
    setting (auto: where it pays)."""


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    bytes: list[int]
    top: list[tuple[str, float, list[int]]]


@dataclass
class SeqOutput:
    """What one choice produced in one engine step."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None
    error: str | None = None
    note: str | None = None
    """Why a choice ended early without an error (a banned phrase it could not avoid)."""
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    stop_string: str | None = None
    """The stop string that ended the choice, when one did."""
    unavailable: bool = False
    """With `error`: the engine itself is gone (its process died): a 503, not a 500."""
    drafted: int = 0
    accepted: int = 0
    """Speculation so far: tokens drafted for this choice, and how many were kept."""


@dataclass(frozen=True)
class ModelInfo:
    """Facts about a loaded model that the serving layer needs."""

    n_ctx: int
    n_ctx_train: int
    n_vocab: int
    bos_token: str
    eos_token: str
    add_bos: bool
    chat_template: str | None
    description: str
    size_bytes: int
    n_params: int
    gpu_offload: bool
    slots: int
    bos_id: int = -1
    """The BOS token's id, -1 when the vocabulary has none."""
    max_token_bytes: int = 64
    """The longest token's text in bytes: a text of more than n_ctx times this many bytes
    cannot fit the context, which is known without tokenizing it."""
    n_layer: int = 0
    gpu_layers: int = 0
    """Layers offloaded to the GPU (the output layer counts as one, as in llama.cpp)."""
    kv_bytes: int = 0
    kv_type: str = "f16"
    add_eos: bool = False
    """The tokenizer appends EOS/SEP to a text (embedding models: the pooled token)."""
    pooling: str | None = None
    """An embedding model's pooling (mean, cls, last, rank); None for a chat model."""
    n_embd: int = 0
    """Floats per pooled output (embedding models): the vector's size, 1 for a reranker."""
    rpc_devices: tuple[str, ...] = ()
    """RPC workers' devices holding layers, as "RPC0 host:port" (first in llama.cpp's
    device order)."""
    devices: tuple[DeviceShare, ...] = ()
    """Where llama.cpp put the model: layers and MiB (weights and KV cache) per device."""


class GenerationHandle(Protocol):
    """A submitted request: iterate it for outputs; cancel it to free its slots."""

    def __aiter__(self) -> AsyncIterator[list[SeqOutput]]: ...

    def cancel(self) -> None: ...


class Engine(Protocol):
    """The small interface every engine (real or fake) offers to the serving layer."""

    info: ModelInfo

    def tokenize(self, text: str, *, add_special: bool) -> list[int]: ...

    def token_text(self, token_id: int) -> str: ...

    def grammar_error(self, grammar: str) -> str | None:
        """None if `grammar` (already bounded in size and depth) compiles, else why not."""
        ...

    def submit(self, request: GenerationRequest) -> GenerationHandle: ...

    def health(self) -> dict[str, Any]: ...

    @property
    def busy(self) -> bool: ...

    def close(self) -> None: ...


class Embedder(Engine, Protocol):
    """An embedding (or rerank) model: pooled outputs for tokenized inputs.

    `embed` returns one vector per input in input order: L2-normalised for embedding
    models, a reranker's raw score(s) for rank pooling. Inputs are packed with other
    requests' into shared decodes; none may be longer than `info.n_ctx`.
    """

    async def embed(self, inputs: list[list[int]]) -> list[npt.NDArray[np.float32]]: ...

    def pair_tokens(self, query: str, document: str) -> list[int]:
        """A (query, document) pair as a reranker reads it (rank pooling)."""
        ...
