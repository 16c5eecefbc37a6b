"""Instruct templates: shipped presets and the sandboxed renderer."""

from server.templates.render import PRESETS, ChatTemplate, load_template

__all__ = ["PRESETS", "ChatTemplate", "load_template"]
