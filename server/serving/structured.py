"""`response_format` -> the grammar that makes the output parse (and validate)."""

from __future__ import annotations

from server.engine.grammar import JSON_OBJECT_GRAMMAR, GrammarError, json_schema_grammar
from server.errors import BadRequestError
from server.protocol.common import ResponseFormat


def response_grammar(fmt: ResponseFormat | None) -> str | None:
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return JSON_OBJECT_GRAMMAR
    assert fmt.json_schema is not None  # checked by the protocol model
    try:
        return json_schema_grammar(fmt.json_schema.schema_)
    except GrammarError as exc:
        raise BadRequestError(f"response_format: {exc}", param="response_format") from exc
