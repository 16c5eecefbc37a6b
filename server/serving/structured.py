"""`response_format` -> the grammar that makes the output parse (and validate)."""

from __future__ import annotations

from server.engine.grammar import (
    JSON_OBJECT_GRAMMAR,
    GrammarError,
    check_grammar_shape,
    json_schema_grammar,
)
from server.engine.types import Engine
from server.errors import BadRequestError
from server.protocol.common import ResponseFormat, SamplingFields


def requested_grammar(request: SamplingFields) -> tuple[str | None, str]:
    """The grammar a request asks for, and the field it came from (for errors):
    `response_format`, or a raw GBNF `grammar` (llama.cpp's and KoboldCpp's field)."""
    from_format = response_grammar(request.response_format)
    if from_format is not None and request.grammar:
        raise BadRequestError("give either response_format or grammar, not both", param="grammar")
    if request.grammar:
        return request.grammar, "grammar"
    return from_format, "response_format"


def response_grammar(fmt: ResponseFormat | None) -> str | None:
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object" and not fmt.schema_:
        return JSON_OBJECT_GRAMMAR
    schema = fmt.schema_ if fmt.type == "json_object" else None
    if schema is None:
        assert fmt.json_schema is not None  # checked by the protocol model
        schema = fmt.json_schema.schema_
    try:
        return json_schema_grammar(schema)
    except GrammarError as exc:
        raise BadRequestError(f"response_format: {exc}", param="response_format") from exc


def check_grammar(engine: Engine, grammar: str, param: str) -> None:
    """A 400 naming `param` unless llama.cpp compiles `grammar`: found before the first
    byte of a stream, never a crash (the shape is bounded before llama.cpp parses it)."""
    try:
        check_grammar_shape(grammar)
    except GrammarError as exc:
        raise BadRequestError(f"{param}: {exc}", param=param) from exc
    problem = engine.grammar_error(grammar)
    if problem is not None:
        raise BadRequestError(f"{param}: {problem}", param=param)
