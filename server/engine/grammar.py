"""GBNF grammars for structured output, from llama-cpp-python's JSON-schema converter.

The converter is the Python port of llama.cpp's `json-schema-to-grammar`; the grammars
it writes are enforced by llama.cpp's grammar sampler in each request's chain.
"""

from __future__ import annotations

from typing import Any

from llama_cpp.llama_grammar import JSON_GBNF, SchemaConverter

# Any JSON object (OpenAI's `response_format: {type: json_object}`).
JSON_OBJECT_GRAMMAR: str = JSON_GBNF


class GrammarError(ValueError):
    """A JSON schema the converter cannot turn into a grammar."""


def json_schema_grammar(schema: dict[str, Any], rule: str = "") -> str:
    """Rules that accept exactly the JSON documents valid under `schema`.

    With the default `rule` the schema becomes the grammar's `root`; with a name, it
    becomes that rule (and its helpers), for the caller to reference from its own root.
    """
    converter = SchemaConverter(  # type: ignore[no-untyped-call]
        prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False
    )
    try:
        resolved = converter.resolve_refs(schema, "schema")
        converter.visit(resolved, rule)  # type: ignore[no-untyped-call]
        return str(converter.format_grammar())  # type: ignore[no-untyped-call]
    except Exception as exc:  # the converter raises assorted types for unsupported input
        raise GrammarError(f"unsupported JSON schema: {exc}") from exc
