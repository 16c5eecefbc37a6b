"""Settings, layered: models.yaml `server:` block < environment `HOSTLER_*` < CLI flags."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from server import durations
from server.errors import ConfigError
from server.registry.schema import ModelsFile, find_models_file

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


class ApiKey(BaseModel):
    """One named API key with optional quotas (the `keys:` list of the `server:` block)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, description="Label shown by /api/v1/auth/key.")
    key: str = Field(min_length=8, description="The secret, sent as 'Bearer <key>'.")
    requests_per_minute: int | None = Field(
        None, ge=1, description="Requests allowed in any 60 s window (429 beyond)."
    )
    tokens_per_day: int | None = Field(
        None, ge=1, description="Prompt + completion tokens per 24 h window (429 beyond)."
    )


class Settings(BaseSettings):
    """Every knob of `hostler serve`. Each field is also env `HOSTLER_<NAME>` and a flag."""

    model_config = SettingsConfigDict(env_prefix="HOSTLER_", extra="forbid")

    models_file: Path | None = Field(
        None,
        description="Path to the model registry (default: ./models.yaml if there is one,"
        " else the packaged registry plus ~/.config/hostler/models.yaml).",
    )
    model: str | None = Field(
        None, description="Model to load at start-up and use when a request names none."
    )
    model_fallback: list[str] = Field(
        ["claude-*", "openrouter/auto"],
        description="Model names (glob patterns) that mean the default model: Claude Code"
        " names claude-* models for its side requests. Any other unknown name is a 404.",
    )
    embedding_model: str | None = Field(
        None,
        description="Embedding model for requests that name none (or a chat model) on the"
        " embedding routes; default: the first `embedding: true` entry that is downloaded.",
    )
    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8000, ge=1, le=65535, description="Port to listen on.")
    api_key: str | None = Field(
        None,
        description="If set, requests need 'Authorization: Bearer <key>' (/health stays open).",
    )
    metrics_key: str | None = Field(
        None,
        min_length=8,
        description="A key that reads /metrics and /v1/loads only (for a router or a"
        " Prometheus scraper, which then never holds a user's key); any API key reads them"
        " too. With no key of either kind they are open.",
    )
    metrics_open: bool = Field(
        False,
        description="/metrics and /v1/loads need no key even when API keys are set (for a"
        " scraper that cannot send one, such as llm-d's endpoint picker); they hold counts"
        " and model names, never a prompt or a key.",
    )
    keys: list[ApiKey] = Field(
        [],
        description="Named API keys with optional quotas, as a JSON/YAML list of"
        " {name, key, requests_per_minute, tokens_per_day}; any of them (or api_key) is"
        " accepted.",
    )
    slots: int | None = Field(
        None, ge=1, le=64, description="Parallel sequences per model (default 4 on CPU, 8 on GPU)."
    )
    max_queue: int = Field(64, ge=0, description="Requests that may wait for a slot before 429.")
    threads: int = Field(0, ge=0, description="CPU threads for llama.cpp (0: one per core).")
    batch_size: int = Field(512, ge=32, description="Tokens per llama_decode step (n_batch).")
    max_models: int = Field(1, ge=1, description="Models kept loaded at once.")
    memory_budget_gib: float | None = Field(
        None,
        gt=0,
        description="Memory the loaded models may take together (weights + KV cache,"
        " estimated from the file and the context); idle ones are unloaded to stay under it.",
    )
    keep_alive: str | None = Field(
        None,
        description="How long a model stays loaded once idle (300, '5m', '1h'; negative or"
        " unset: until another needs the room); models.yaml and requests may say otherwise.",
    )
    flash_attn: bool | None = Field(
        None, description="Flash attention on or off; unset lets llama.cpp decide (auto)."
    )
    shutdown_grace: float = Field(
        30.0, ge=0, description="Seconds in-flight requests may finish after SIGTERM."
    )
    speculative: Literal["auto", "off", "ngram"] = Field(
        "off",
        description="N-gram speculative decoding for every model: auto drafts where the"
        " measured acceptance and step costs say it pays, ngram whenever the text repeats,"
        " off never (the default, until auto is shown not to slow prose). The output is the"
        " same either way; models.yaml and requests (`speculative`) may say otherwise.",
    )
    cache_reuse: int | None = Field(
        None,
        ge=0,
        description="Chunk reuse for every model: the shortest run of tokens kept and shifted"
        " after trimmed messages (0: off); unset uses each model's cache_reuse.",
    )
    cache_ram_mib: int = Field(
        8192, ge=0, description="Host-RAM prompt cache per model, in MiB (0: off)."
    )
    cache_disk_gib: float = Field(
        8.0, ge=0, description="Disk prompt cache per model, in GiB (0: off)."
    )
    cache_dir: Path = Field(
        Path.home() / ".cache" / "hostler" / "prompt-cache",
        description="Folder of the disk prompt cache.",
    )
    keepalive: float = Field(
        5.0, gt=0, description="Seconds between ': HOSTLER PROCESSING' SSE comments."
    )
    cors_origins: list[str] = Field(
        [],
        description="Browser origins allowed to call the API (CORS), e.g."
        " http://localhost:3000; none by default, '*' for any.",
    )
    allowed_hosts: list[str] | None = Field(
        None,
        description="Host header values accepted (DNS-rebinding guard); default: loopback"
        " names when bound to loopback, any otherwise; '*' for any.",
    )
    max_body_mb: float = Field(
        8.0, gt=0, description="Largest request body in MiB (413 beyond, before parsing)."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Log level: debug, info, warning, error."
    )

    _keep_alive = field_validator("keep_alive")(durations.checked)

    @property
    def keep_alive_seconds(self) -> float | None:
        return durations.keep_alive(self.keep_alive)

    @property
    def hosts(self) -> list[str] | None:
        """Host names to accept, or None for any."""
        if self.allowed_hosts is not None:
            return None if "*" in self.allowed_hosts else self.allowed_hosts
        if self.host in LOOPBACK_HOSTS:
            return list(LOOPBACK_HOSTS)
        return None


class _YamlServerBlock(PydanticBaseSettingsSource):
    def __init__(self, settings_cls: type[BaseSettings], block: dict[str, Any]) -> None:
        super().__init__(settings_cls)
        self._block = block

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self._block.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._block)


def load_settings(
    overrides: dict[str, Any] | None = None,
) -> tuple[Settings, ModelsFile]:
    """Build Settings from the three layers; also return the parsed models file."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    explicit = overrides.get("models_file") or os.environ.get("HOSTLER_MODELS_FILE")
    path, models = find_models_file(Path(explicit) if explicit else None)
    block = dict(models.server)
    block["models_file"] = path

    class _Layered(Settings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            return (init_settings, env_settings, _YamlServerBlock(settings_cls, block))

    try:
        layered = _Layered(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ConfigError(
            f"invalid setting '{'.'.join(str(x) for x in first['loc'])}': {first['msg']}"
        ) from exc
    return Settings.model_construct(
        **{k: getattr(layered, k) for k in Settings.model_fields}
    ), models
