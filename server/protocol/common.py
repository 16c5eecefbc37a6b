"""Pieces shared by several endpoints: usage, logprobs, sampler fields."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from server import durations
from server.protocol.aliases import from_foreign

# Bounds on what one request may ask for, checked before anything is allocated. Windows
# (penalty ranges) are further bounded by the model's context in serving/params.py.
INT32_MAX = 2**31 - 1
MAX_STOPS = 64  # group chats stop on every member's name
MAX_STOP_CHARS = 1_000
MAX_LOGIT_BIAS = 1_024
MAX_BREAKERS = 64
MAX_BREAKER_CHARS = 64
MAX_MODELS = 16
MAX_BIAS_KEY_CHARS = 128
# Exact limits on banned phrases are the engine's (engine/bans.py); these only bound
# what is parsed at all.
MAX_BANNED_ENTRIES = 16_384 + 64
MAX_BANNED_CHARS = 1_024
TOKEN_ID = re.compile(r"-?[0-9]{1,10}")


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)
    type: str
    json_schema: JsonSchemaFormat | None = None
    schema_: dict[str, Any] | None = Field(
        None,
        alias="schema",
        description="llama-server's extension: `{type: json_object, schema: {...}}`.",
    )

    @field_validator("type")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in ("text", "json_object", "json_schema"):
            raise ValueError("must be 'text', 'json_object' or 'json_schema'")
        return v

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs a 'json_schema' object with a 'schema'")
        return self


class BannedString(BaseModel):
    """One `banned_strings` entry in object form: a phrase or a regular expression."""

    model_config = ConfigDict(extra="forbid")
    text: str | None = Field(None, min_length=1, max_length=MAX_BANNED_CHARS)
    regex: str | None = Field(None, min_length=1, max_length=MAX_BANNED_CHARS)
    case_sensitive: bool = False

    @model_validator(mode="after")
    def _one(self) -> BannedString:
        if (self.text is None) == (self.regex is None):
            raise ValueError("give exactly one of 'text' and 'regex'")
        return self


class SamplingFields(BaseModel):
    """Generation parameters common to chat and text completions (OpenAI + OpenRouter)."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    model: str | None = Field(None, max_length=256)
    models: list[str] | None = Field(
        None, max_length=MAX_MODELS, description="OpenRouter fallback list."
    )
    route: str | None = None
    max_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0, le=INT32_MAX)
    min_p: float | None = Field(None, ge=0, le=1)
    top_a: float | None = Field(None, ge=0, le=1)
    typical_p: float | None = Field(None, gt=0, le=1)
    top_n_sigma: float | None = Field(None, ge=0, le=1000)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=2)
    repetition_penalty_range: int | None = Field(None, ge=-1, le=INT32_MAX)
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    min_tokens: int | None = Field(None, ge=0, le=INT32_MAX)
    ignore_eos: bool | None = None
    dry_multiplier: float | None = Field(None, ge=0, le=100)
    dry_base: float | None = Field(None, ge=1, le=100)
    dry_allowed_length: int | None = Field(None, ge=0, le=INT32_MAX)
    dry_penalty_last_n: int | None = Field(None, ge=-1, le=INT32_MAX)
    dry_sequence_breakers: list[str] | None = Field(None, max_length=MAX_BREAKERS)
    xtc_threshold: float | None = Field(None, ge=0, le=1)
    xtc_probability: float | None = Field(None, ge=0, le=1)
    mirostat_mode: int | None = Field(None, ge=0, le=2)
    mirostat_tau: float | None = Field(None, ge=0, le=1000)
    mirostat_eta: float | None = Field(None, ge=0, le=1000)
    dynatemp_range: float | None = Field(None, ge=0, le=100)
    dynatemp_exponent: float | None = Field(None, ge=0, le=100)
    sampler_order: list[str] | None = Field(None, max_length=32)
    tfs: float | None = Field(None, gt=0, le=1, description="Tail-free sampling's z.")
    smoothing_factor: float | None = Field(None, ge=0, le=100)
    smoothing_curve: float | None = Field(None, ge=1, le=10)
    adaptive_target: float | None = Field(
        None, ge=-1, le=1, description="adaptive-p's target probability; negative: off."
    )
    adaptive_decay: float | None = Field(None, ge=0, le=0.99)
    banned_strings: list[str | BannedString] | None = Field(
        None,
        max_length=MAX_BANNED_ENTRIES,
        description="Phrases the reply must never contain: plain text (case-insensitive)"
        " or {text|regex, case_sensitive}. Generation rewinds when one starts to form.",
    )
    preset: str | None = Field(None, max_length=64, description="A preset of the model's.")
    speculative: bool | None = Field(
        None,
        description="N-gram speculation for this request: false never drafts, true drafts"
        " whenever the text repeats; unset: the model's setting (auto: where it pays)."
        " The output is the same either way.",
    )
    keep_alive: str | float | None = Field(
        None,
        description="Ollama's keep_alive for the model after this reply: seconds or '5m',"
        " 0 unloads it once idle, negative keeps it loaded.",
    )
    transforms: list[str] | None = Field(None, max_length=16)
    provider: dict[str, Any] | None = None
    user: str | None = None
    grammar: str | None = Field(
        None,
        max_length=512 * 1024,
        description="A GBNF grammar the output must follow (llama.cpp's, KoboldCpp's"
        " `grammar`; text-generation-webui's `grammar_string`).",
    )

    @model_validator(mode="before")
    @classmethod
    def _foreign_names(cls, data: Any) -> Any:
        # Other servers' names and forms for these fields (protocol/aliases.py).
        return from_foreign(data)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else v or []
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"a stop sequence may be at most {MAX_STOP_CHARS} characters")
        return v

    _keep_alive = field_validator("keep_alive")(durations.checked)

    @field_validator("dry_sequence_breakers")
    @classmethod
    def _breakers(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and any(len(b) > MAX_BREAKER_CHARS for b in v):
            raise ValueError(f"a sequence breaker may be at most {MAX_BREAKER_CHARS} characters")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        # Keys are token ids (ASCII digits: str.isdigit() also accepts '²', which int()
        # rejects) or text, whose tokens are biased (serving/params.py).
        if v is not None and len(v) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} entries")
        for key, val in (v or {}).items():
            if not key or len(key) > MAX_BIAS_KEY_CHARS:
                raise ValueError(f"a key is a token id or text of 1 to {MAX_BIAS_KEY_CHARS} chars")
            if not -100 <= val <= 100:
                raise ValueError(f"bias for {key[:20]!r} must be between -100 and 100")
        return v

    @field_validator("banned_strings", mode="before")
    @classmethod
    def _banned_objects(cls, v: Any) -> Any:
        # An object entry is checked as one, so its error says what is wrong with it
        # (rather than "should be a valid string", the union's first branch).
        if isinstance(v, list):
            return [BannedString.model_validate(b) if isinstance(b, dict) else b for b in v]
        return v

    @field_validator("banned_strings")
    @classmethod
    def _banned(cls, v: list[str | BannedString] | None) -> list[str | BannedString] | None:
        if v is not None and any(isinstance(b, str) and len(b) > MAX_BANNED_CHARS for b in v):
            raise ValueError(f"an entry may be at most {MAX_BANNED_CHARS} characters")
        return v

    @model_validator(mode="after")
    def _logprobs_needs_flag(self) -> SamplingFields:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs: true")
        return self

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def wanted_logprobs(self) -> int | None:
        """None: no logprobs; k: the sampled token's logprob and k alternatives."""
        if not self.logprobs:
            return None
        return self.top_logprobs or 0

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens
