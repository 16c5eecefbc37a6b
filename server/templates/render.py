"""Render chat messages to a prompt string in jinja2's immutable sandbox.

A GGUF file's `tokenizer.chat_template` is untrusted input: it runs in a bounded
`ImmutableSandboxedEnvironment` (templates/sandbox.py), which blocks attribute access to
internals and mutation of the objects passed in, and bounds time and memory.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from typing import Any

import jinja2

from server.templates.sandbox import (
    BoundedSandbox,
    TemplateError,
    bounded_filter,
    run_with_deadline,
)

# What one render may cost (see templates/sandbox.py for the bounds on each operation).
MAX_RENDER_SECONDS = 5.0
MAX_OUTPUT_CHARS = 16 * 2**20  # the prompt text; far beyond any model's context

# Preset name -> stop strings that end a turn in that format (besides the model's EOS).
PRESETS: dict[str, tuple[str, ...]] = {
    "chatml": ("<|im_end|>", "<|im_start|>"),
    "mistral": ("</s>", "[INST]"),
    "alpaca": ("### Instruction:", "### Response:"),
    "llama3": ("<|eot_id|>", "<|start_header_id|>"),
    "metharme": ("<|user|>", "<|system|>", "<|model|>"),
    "gemma": ("<end_of_turn>", "<start_of_turn>"),
    "vicuna": ("USER:", "</s>"),
}


__all__ = ["ChatTemplate", "TemplateError", "load_template", "preset_source"]


def _raise(message: str) -> None:
    raise TemplateError(message)


def _tojson(value: Any, indent: int | None = None, **_: Any) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _environment() -> BoundedSandbox:
    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.Undefined)
    env.filters["tojson"] = _tojson
    env.filters = {name: bounded_filter(f) for name, f in env.filters.items()}
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


_ENV = _environment()


@functools.lru_cache(maxsize=64)
def _compiled(source: str) -> jinja2.Template:
    """Compile each template source once (compiling costs milliseconds; rendering, micro)."""
    return _ENV.from_string(source)


@dataclass(frozen=True)
class ChatTemplate:
    """A compiled template and the stop strings that belong to its format."""

    name: str
    source: str
    stop: tuple[str, ...] = ()

    def render(
        self,
        messages: list[dict[str, Any]],
        *,
        bos_token: str,
        eos_token: str,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> str:
        """The prompt text (`extra`: more template variables, e.g. enable_thinking).
        Bounded in time and size; never raises anything but TemplateError, whatever the
        template does. Call it off the event loop."""

        def render() -> str:
            out: list[str] = []
            size = 0
            context = {
                **(extra or {}),  # ours below win over a client's variable of the same name
                "messages": messages,
                "bos_token": bos_token,
                "eos_token": eos_token,
                "add_generation_prompt": add_generation_prompt,
                "tools": tools,
            }
            for part in _compiled(self.source).generate(context):
                size += len(part)
                if size > MAX_OUTPUT_CHARS:
                    raise TemplateError(f"template '{self.name}' wrote more than the limit")
                out.append(part)
            return "".join(out)

        try:
            return run_with_deadline(render, MAX_RENDER_SECONDS)
        except TemplateError:
            raise
        except Exception as exc:  # the template is untrusted: any failure is its own
            raise TemplateError(f"template '{self.name}' failed: {exc}") from exc


def preset_source(name: str) -> str:
    return (resources.files("server.templates") / "presets" / f"{name}.jinja").read_text("utf-8")


def load_template(name: str | None, gguf_template: str | None) -> ChatTemplate:
    """Resolve a template: a named preset, else the GGUF's own template, else ChatML.

    `name` may be a preset name, `gguf` (the model's own), or None (same as `gguf`).
    """
    if name and name != "gguf":
        if name not in PRESETS:
            known = ", ".join(sorted(PRESETS))
            raise TemplateError(f"unknown template '{name}' (known: gguf, {known})")
        return ChatTemplate(name, preset_source(name), PRESETS[name])
    if gguf_template:
        try:
            _compiled(gguf_template)
        except (jinja2.TemplateError, RecursionError, MemoryError, ValueError) as exc:
            raise TemplateError(f"the model's chat template does not compile: {exc}") from exc
        return ChatTemplate("gguf", gguf_template, _guess_stops(gguf_template))
    return ChatTemplate("chatml", preset_source("chatml"), PRESETS["chatml"])


def _guess_stops(source: str) -> tuple[str, ...]:
    """Turn-end markers of a known format found in a GGUF template."""
    for stops in PRESETS.values():
        if stops[0] in source and stops[0].startswith("<"):
            return (stops[0],)
    return ()
