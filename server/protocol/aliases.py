"""Sampler fields as other servers name and shape them, mapped onto ours.

Text-completion frontends (SillyTavern's llama.cpp, KoboldCpp, TabbyAPI and
text-generation-webui types) send their backend's names and forms alongside or instead
of OpenAI's: `rep_pen`, `n_predict`, `sampler_seed`, `dry_sequence_breakers` as a JSON
string, `logit_bias` as `[[id, bias], ...]`, Kobold's integer `sampler_order`, ... Each
is translated here, before validation, into the one set of fields the engine knows. A
name of ours that the request also set wins; a foreign name that means nothing here
stays in the body and is reported in `X-Hostler-Ignored-Params`.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

# foreign name -> our name, for values that mean the same.
RENAMES: dict[str, str] = {
    "max_new_tokens": "max_tokens",
    "n_predict": "max_tokens",
    "num_predict": "max_tokens",
    "max_length": "max_tokens",
    "rep_pen": "repetition_penalty",
    "repeat_penalty": "repetition_penalty",
    "rep_pen_range": "repetition_penalty_range",
    "repeat_last_n": "repetition_penalty_range",
    "typical": "typical_p",
    "sampler_seed": "seed",
    "stopping_strings": "stop",
    "stop_sequence": "stop",
    "ban_eos_token": "ignore_eos",
    "mirostat": "mirostat_mode",
    "grammar_string": "grammar",
    "guided_grammar": "grammar",
    "min_length": "min_tokens",
    "tfs_z": "tfs",
    "banned_phrases": "banned_strings",
    "smoothing": "smoothing_factor",
    "model_id": "model",  # ModelsLab's sample code
}

# Stage names in other servers' order lists -> ours (None: a stage with a fixed place).
_STAGES: dict[str, str | None] = {
    "top_k": "top_k",
    "top_p": "top_p",
    "min_p": "min_p",
    "typ_p": "typical_p",
    "typical_p": "typical_p",
    "typical": "typical_p",
    "xtc": "xtc",
    "temperature": "temperature",
    "temp": "temperature",
    "dynamic_temperature": "temperature",
    "top_n_sigma": "top_n_sigma",
    "top_a": "top_a",
    "tfs": "tfs",
    "tfs_z": "tfs",
    "tail_free": "tfs",
    "quadratic_sampling": "smoothing",
    "quadratic": "smoothing",
    "smoothing": "smoothing",
}
# KoboldCpp's integer ids: 0 top-k, 1 top-a, 2 top-p, 3 tfs, 4 typical, 5 temperature,
# 6 repetition penalty (which has a fixed place here).
_KOBOLD_STAGES: dict[int, str] = {
    0: "top_k",
    1: "top_a",
    2: "top_p",
    3: "tfs",
    4: "typical_p",
    5: "temperature",
}


def _order(names: list[Any]) -> list[str]:
    """Our stage names, in the order given, once each; others have fixed places here."""
    out: list[str] = []
    for name in names:
        if isinstance(name, bool):
            continue
        stage = _KOBOLD_STAGES.get(name) if isinstance(name, int) else None
        if isinstance(name, str):
            stage = _STAGES.get(name.strip().lower())
        if stage is not None and stage not in out:
            out.append(stage)
    return out


def _bias_pairs(pairs: list[Any]) -> dict[str, float] | None:
    """llama.cpp's `[[id, bias], ...]` (bias `false` bans) as OpenAI's {id: bias}."""
    out: dict[str, float] = {}
    for pair in pairs:
        if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], int)):
            return None  # not this form (or string keys): leave it to validation
        bias = pair[1]
        out[str(pair[0])] = -100.0 if bias is False else bias
    return out


def _token_ids(value: Any) -> list[int]:
    """A ban list: ids as a list, or as text like "1, 2, 3" (SillyTavern's)."""
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    if isinstance(value, str):
        return [int(v) for v in value.replace(",", " ").split() if v.strip().isdigit()]
    return []


def _phrases(value: Any) -> list[str]:
    """KoboldCpp's `banned_tokens`: a list of phrases (its anti-slop list)."""
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str) and v]
    return []


def from_foreign(data: Any) -> Any:
    """The request body with foreign names and forms turned into ours (a new dict)."""
    if not isinstance(data, dict):
        return data
    body = dict(data)
    # ModelsLab sends its API key in the body; api/deps.py checked it: never kept.
    body.pop("key", None)
    for foreign, ours in RENAMES.items():
        if foreign in body:
            value = body.pop(foreign)
            if ours == "max_tokens" and value == -1:  # llama.cpp: until the context is full
                continue
            if body.get(ours) is None:
                body[ours] = value
    if body.get("seed") == -1:  # "random" in every text-completion UI
        body["seed"] = None
    breakers = body.get("dry_sequence_breakers")
    if isinstance(breakers, str):
        with contextlib.suppress(ValueError):  # else validation names the field
            body["dry_sequence_breakers"] = json.loads(breakers)
    # Our own `sampler_order` (names) stays strict; Kobold's ids, llama.cpp's `samplers`
    # and text-generation-webui's `sampler_priority` are read leniently.
    for name in ("sampler_order", "samplers", "sampler_priority"):
        order = body.get(name)
        if not isinstance(order, list):
            continue
        if name == "sampler_order" and not any(isinstance(x, int) for x in order):
            continue
        body.pop(name)
        if body.get("sampler_order") is None or name == "sampler_order":
            body["sampler_order"] = _order(order)
    # text-generation-webui: temperature_last moves temperature to the end of the order;
    # without it, its default order starts with temperature.
    last = body.pop("temperature_last", None)
    order = body.get("sampler_order")
    if last is True and isinstance(order, list) and "temperature" in order:
        body["sampler_order"] = [s for s in order if s != "temperature"] + ["temperature"]
    elif last is False and order is None:
        body["sampler_order"] = ["temperature"]
    bias = body.get("logit_bias")
    if isinstance(bias, list):
        pairs = _bias_pairs(bias)
        if pairs is not None:
            body["logit_bias"] = pairs
    kobold_bans = body.pop("banned_tokens", None)
    phrases = _phrases(kobold_bans)
    if phrases:
        current = body.get("banned_strings")
        if current is None or isinstance(current, list):
            body["banned_strings"] = [*(current or []), *phrases]
    bans = _token_ids(body.pop("custom_token_bans", None)) + _token_ids(kobold_bans)
    if bans and (body.get("logit_bias") is None or isinstance(body.get("logit_bias"), dict)):
        merged = {str(t): -100.0 for t in bans}
        merged.update(body.get("logit_bias") or {})
        body["logit_bias"] = merged
    schema = body.pop("json_schema", None)
    if schema is None:
        schema = body.pop("guided_json", None)
    if isinstance(schema, dict) and schema and body.get("response_format") is None:
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "schema", "schema": schema},
        }
    elif schema not in (None, {}):
        body["json_schema"] = schema  # not usable here: reported
    if body.get("grammar") == "":
        body.pop("grammar")
    return body
