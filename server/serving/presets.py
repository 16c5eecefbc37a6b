"""A model's presets applied to a request: `defaults` and a named `preset` fill what the
request leaves unset, `strip` drops request fields, `force` overrides them."""

from __future__ import annotations

from typing import Any, TypeVar

from server.engine.bans import Ban
from server.errors import BadRequestError
from server.protocol.common import SamplingFields
from server.registry.schema import BannedEntry, ModelSpec

R = TypeVar("R", bound=SamplingFields)


def apply_presets(request: R, spec: ModelSpec) -> tuple[R, list[str]]:
    """The request as the model's presets make it, and the names of the fields the
    client sent that were not used as sent (for X-Hostler-Ignored-Params)."""
    fill: dict[str, Any] = spec.defaults.model_dump(exclude_none=True)
    if request.preset is not None:
        preset = spec.presets.get(request.preset)
        if preset is None:
            known = ", ".join(sorted(spec.presets)) or "none"
            raise BadRequestError(
                f"preset '{request.preset[:64]}' is not one of model '{spec.id}''s"
                f" presets ({known})",
                param="preset",
            )
        fill |= preset.model_dump(exclude_none=True)
    sent = {name for name in request.model_fields_set if getattr(request, name) is not None}
    update = {name: value for name, value in fill.items() if name not in sent}
    overridden: list[str] = []
    for name in spec.strip:
        if name in sent:
            overridden.append(name)
            update[name] = fill.get(name)
    for name, value in spec.force.model_dump(exclude_none=True).items():
        if name in sent and getattr(request, name) != value:
            overridden.append(name)
        update[name] = value
    if not update:
        return request, overridden
    return request.model_copy(update=update), sorted(set(overridden))


def model_bans(spec: ModelSpec) -> tuple[Ban, ...]:
    """The model's own banned phrases, in the engine's terms."""
    out: list[Ban] = []
    for entry in spec.banned_strings:
        if isinstance(entry, str):
            out.append(Ban(entry))
        elif isinstance(entry, BannedEntry) and entry.regex is not None:
            out.append(Ban(entry.regex, regex=True, case_sensitive=entry.case_sensitive))
        elif isinstance(entry, BannedEntry) and entry.text is not None:
            out.append(Ban(entry.text, case_sensitive=entry.case_sensitive))
    return tuple(out)
