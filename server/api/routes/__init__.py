"""Thin routes: parse, call the serving layer, return JSON or a stream."""
