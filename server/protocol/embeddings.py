"""Embedding and rerank requests, in every frontend's shape.

OpenAI's `/v1/embeddings` (also llama.cpp's and KoboldCpp's, which add `content` and
`truncate`), Ollama's `/api/embed` and legacy `/api/embeddings`, and the Jina/Cohere
rerank body (`/v1/rerank`) with TEI's `texts` variant. Inputs are checked here, before
anything is tokenized: at most MAX_INPUTS of them, each a string or a list of token ids.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

MAX_INPUTS = 2048
"""Inputs per request (OpenAI's own limit; RisuAI sends 50, SillyTavern 10)."""

EmbeddingInput = str | list[int]

_SHAPE = "must be a string, a list of strings, a list of token ids, or a list of lists of token ids"


def _token_ids(items: list[Any]) -> list[int] | None:
    """`items` as token ids if every one is a non-negative int (bools are not)."""
    if all(type(x) is int and x >= 0 for x in items):
        return list(items)
    return None


def check_inputs(value: Any) -> list[EmbeddingInput]:
    """OpenAI's four shapes of `input`, as a list of inputs (one text or one token list
    each); a ValueError that says what is wrong otherwise."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise ValueError(_SHAPE)
    if not value:
        raise ValueError("must not be empty")
    if len(value) > MAX_INPUTS:
        raise ValueError(f"at most {MAX_INPUTS} inputs per request (got {len(value)})")
    if all(type(x) is int for x in value):
        ids = _token_ids(value)
        if ids is None:
            raise ValueError("token ids must not be negative")
        return [ids]
    out: list[EmbeddingInput] = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, list) and item:
            ids = _token_ids(item)
            if ids is None:
                raise ValueError(f"item {i} is not a list of token ids (non-negative integers)")
            out.append(ids)
        elif isinstance(item, list):
            raise ValueError(f"item {i} is an empty list of token ids")
        else:
            raise ValueError(
                f"item {i} ({type(item).__name__}) is neither a string nor a list of token ids"
            )
    return out


def check_texts(value: Any) -> list[str]:
    """A string or a non-empty list of at most MAX_INPUTS strings, as a list."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise ValueError("must be a string or a list of strings")
    if len(value) > MAX_INPUTS:
        raise ValueError(f"at most {MAX_INPUTS} inputs per request (got {len(value)})")
    return value


Inputs = Annotated[list[EmbeddingInput], BeforeValidator(check_inputs)]
Texts = Annotated[list[str], BeforeValidator(check_texts)]


class EmbeddingRequest(BaseModel):
    """OpenAI's body. `model` is optional: SillyTavern's llama.cpp source sends none."""

    model_config = ConfigDict(extra="allow")
    model: str | None = Field(None, max_length=256)
    input: Inputs
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(
        None, ge=1, le=65536, description="Fewer numbers per vector (Matryoshka models)."
    )
    truncate: bool = Field(
        False, description="Cut an input longer than the model's context (else a 400)."
    )
    user: str | None = Field(None, max_length=256)


class LlamaEmbeddingRequest(EmbeddingRequest):
    """llama-server's `/embedding` and `/embeddings`: `content` is the old name of `input`."""

    input: Inputs = Field(default_factory=list)
    content: Inputs | None = None

    @model_validator(mode="after")
    def _one_input(self) -> LlamaEmbeddingRequest:
        if self.content is not None and not self.input:
            self.input = self.content
        if not self.input:
            raise ValueError('"input" or "content" must be provided')
        return self


class KoboldEmbeddingRequest(EmbeddingRequest):
    """KoboldCpp's `/api/extra/embeddings`: OpenAI's body; KoboldAI Lite sends truncate."""

    truncate: bool = True


class OllamaEmbedRequest(BaseModel):
    """Ollama's `/api/embed`: no input only loads the model."""

    model_config = ConfigDict(extra="allow")
    model: str | None = Field(None, max_length=256)
    input: Texts = Field(default_factory=list)
    truncate: bool = True
    dimensions: int | None = Field(None, ge=1, le=65536)
    keep_alive: str | int | float | None = None
    options: dict[str, Any] | None = Field(None, max_length=64)


class OllamaEmbeddingsRequest(BaseModel):
    """Ollama's legacy `/api/embeddings` (what SillyTavern calls): one `prompt`."""

    model_config = ConfigDict(extra="allow")
    model: str | None = Field(None, max_length=256)
    prompt: str = ""
    keep_alive: str | int | float | None = None
    options: dict[str, Any] | None = Field(None, max_length=64)


def _documents(value: Any) -> Any:
    """Cohere's v1 documents may be objects with `text`."""
    if isinstance(value, list):
        return [d.get("text") if isinstance(d, dict) and "text" in d else d for d in value]
    return value


class RerankRequest(BaseModel):
    """Jina's and Cohere's body (`documents`), or TEI's (`texts`, answered as a list)."""

    model_config = ConfigDict(extra="allow")
    model: str | None = Field(None, max_length=256)
    query: str = Field(min_length=1)
    documents: Annotated[list[str], BeforeValidator(_documents)] | None = Field(
        None, max_length=MAX_INPUTS
    )
    texts: list[str] | None = Field(None, max_length=MAX_INPUTS)
    top_n: int | None = Field(None, ge=1)
    return_documents: bool = False
    return_text: bool = False
    truncate: bool = Field(True, description="Cut a document longer than the context.")

    @model_validator(mode="after")
    def _some_documents(self) -> RerankRequest:
        docs = self.documents if self.documents is not None else self.texts
        if not docs:
            raise ValueError('"documents" must be a non-empty list of strings')
        return self

    @property
    def tei(self) -> bool:
        """TEI's shape: `texts` in, a bare list of {index, score} out."""
        return self.documents is None and self.texts is not None

    @property
    def docs(self) -> list[str]:
        return self.documents if self.documents is not None else self.texts or []
