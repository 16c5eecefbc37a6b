"""One exception tree: each error knows its HTTP status and OpenAI error `type`."""

from __future__ import annotations

from typing import Any, ClassVar


class HostlerError(Exception):
    """Base of every error Hostler reports to a client."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers or {}
        self.metadata = metadata

    def to_body(self) -> dict[str, Any]:
        """The error in OpenRouter's shape (`code`) with OpenAI's `type` and `param`."""
        error: dict[str, Any] = {
            "code": self.status,
            "message": self.message,
            "type": self.type,
            "param": self.param,
        }
        if self.metadata:
            error["metadata"] = self.metadata
        return {"error": error}


class BadRequestError(HostlerError):
    status = 400
    type = "invalid_request_error"


class ContextLengthError(BadRequestError):
    """Prompt plus requested completion does not fit the model's context."""

    def __init__(
        self, message: str, *, param: str | None = None, tokens: int | None = None,
        limit: int | None = None,
    ) -> None:  # fmt: skip
        super().__init__(message, param=param)
        self.tokens = tokens  # the prompt's tokens (plus max_tokens), when counted
        self.limit = limit  # the context


class AuthenticationError(HostlerError):
    status = 401
    type = "authentication_error"


class ForbiddenError(HostlerError):
    status = 403
    type = "permission_error"


class PayloadTooLargeError(HostlerError):
    status = 413
    type = "invalid_request_error"


class NotFoundError(HostlerError):
    status = 404
    type = "not_found_error"


class ModelNotFoundError(NotFoundError):
    """The requested model is not in the registry (or not available locally)."""


class QueueFullError(HostlerError):
    status = 429
    type = "rate_limit_error"


class RateLimitError(QueueFullError):
    """A key's request rate or token quota is used up."""


class ServiceUnavailableError(HostlerError):
    status = 503
    type = "service_unavailable_error"


class ModelLoadError(ServiceUnavailableError):
    """The model file exists but llama.cpp could not load it."""


class EngineError(HostlerError):
    """Generation failed inside the engine after it was accepted."""

    status = 500
    type = "server_error"


class EngineGoneError(EngineError):
    """The engine serving the request died (its process ended): try again shortly."""

    status = 503
    type = "service_unavailable_error"


class ConfigError(Exception):
    """A configuration file is invalid. Not an HTTP error: raised at start-up."""


class DownloadError(Exception):
    """A model file could not be downloaded or failed verification."""
