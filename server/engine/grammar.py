"""GBNF grammars for structured output, from llama-cpp-python's JSON-schema converter.

The converter is the Python port of llama.cpp's `json-schema-to-grammar`; the grammars
it writes are enforced by llama.cpp's grammar sampler in each request's chain.

llama.cpp's grammar parser is recursive (one C++ frame per nested group) and aborts the
process on some inputs, so every grammar is checked here first: size and nesting depth
are bounded before llama.cpp sees it, then it is compiled once at validation time
(`LlamaModel.grammar_error`), so a bad one is a 400 before the first byte.
"""

from __future__ import annotations

from typing import Any

from llama_cpp.llama_grammar import JSON_GBNF, SchemaConverter

# Any JSON object (OpenAI's `response_format: {type: json_object}`).
JSON_OBJECT_GRAMMAR: str = JSON_GBNF

# Far above what real schemas produce (tens of KiB, nesting under 10), far below what
# overflows the parser's stack (tens of thousands of nested groups).
MAX_GRAMMAR_BYTES = 512 * 1024
MAX_GRAMMAR_DEPTH = 128
# The converter itself recurses over the schema.
MAX_SCHEMA_DEPTH = 64


class GrammarError(ValueError):
    """A schema or grammar that cannot be used (unsupported, too large, invalid)."""


def _schema_depth(node: Any, depth: int = 0) -> int:
    if depth > MAX_SCHEMA_DEPTH:
        return depth
    if isinstance(node, dict):
        return max((_schema_depth(v, depth + 1) for v in node.values()), default=depth)
    if isinstance(node, list):
        return max((_schema_depth(v, depth + 1) for v in node), default=depth)
    return depth


def json_schema_grammar(schema: dict[str, Any], rule: str = "") -> str:
    """Rules that accept exactly the JSON documents valid under `schema`.

    With the default `rule` the schema becomes the grammar's `root`; with a name, it
    becomes that rule (and its helpers), for the caller to reference from its own root.
    """
    if _schema_depth(schema) > MAX_SCHEMA_DEPTH:
        raise GrammarError(f"the JSON schema is nested more than {MAX_SCHEMA_DEPTH} levels deep")
    converter = SchemaConverter(  # type: ignore[no-untyped-call]
        prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False
    )
    try:
        resolved = converter.resolve_refs(schema, "schema")
        converter.visit(resolved, rule)  # type: ignore[no-untyped-call]
        grammar = str(converter.format_grammar())  # type: ignore[no-untyped-call]
    except RecursionError as exc:
        raise GrammarError("the JSON schema is too deeply nested") from exc
    except Exception as exc:  # the converter raises assorted types for unsupported input
        raise GrammarError(f"unsupported JSON schema: {exc}") from exc
    check_grammar_shape(grammar)
    return grammar


def check_grammar_shape(grammar: str) -> None:
    """Raise GrammarError when a grammar is too large or nests groups too deeply."""
    size = len(grammar.encode("utf-8"))
    if size > MAX_GRAMMAR_BYTES:
        raise GrammarError(
            f"the grammar is {size} bytes, more than {MAX_GRAMMAR_BYTES}"
            " (large repetition counts such as maxLength or {m,n} in a pattern cost the most)"
        )
    depth = grammar_depth(grammar)
    if depth > MAX_GRAMMAR_DEPTH:
        raise GrammarError(
            f"the grammar nests groups {depth} deep, more than {MAX_GRAMMAR_DEPTH}"
            " (large repetition counts such as maxLength or {m,n} in a pattern cause this)"
        )


def grammar_depth(grammar: str) -> int:
    """The deepest nesting of `( )` groups, outside literals, classes and comments."""
    depth = deepest = 0
    quote: str | None = None  # '"' inside a literal, ']' inside a character class
    escaped = comment = False
    for ch in grammar:
        if comment:
            comment = ch not in "\r\n"
        elif quote is not None:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == quote:
                quote = None
        elif ch == '"':
            quote = '"'
        elif ch == "[":
            quote = "]"
        elif ch == "#":
            comment = True
        elif ch == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif ch == ")":
            depth -= 1
    return deepest
