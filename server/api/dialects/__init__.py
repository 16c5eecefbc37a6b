"""Adapters for foreign APIs: each maps its wire shape onto the same serving calls."""
