"""Validate user input with pydantic and report errors a person can act on."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from kvtier.core.errors import ConfigError, quote, shorten
from kvtier.core.plugins import closest

M = TypeVar("M", bound=BaseModel)


def _fields_at(model: type[BaseModel], loc: tuple[int | str, ...]) -> list[str]:
    """Valid field names of the (sub)model that ``loc`` points into."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        fields = getattr(current, "model_fields", {})
        if part not in fields:
            return []
        annotation = fields[part].annotation
        args = getattr(annotation, "__args__", ())
        candidates = [
            a for a in (annotation, *args) if isinstance(a, type) and issubclass(a, BaseModel)
        ]
        if not candidates:
            return []
        current = candidates[0]
    return list(getattr(current, "model_fields", {}))


def describe(exc: ValidationError, model: type[BaseModel], where: str) -> str:
    """One line per problem: path, what is wrong, and the closest valid key for typos."""
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        path = ".".join(str(p) for p in loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            valid = _fields_at(model, loc)
            hint = closest(str(loc[-1]), valid)
            lines.append(
                f"{where}: unknown key {path!r}{hint}; valid keys here: {', '.join(valid)}"
            )
        elif err["type"] == "missing":
            lines.append(f"{where}: {path!r} is required but missing")
        else:
            hidden = model.model_config.get("hide_input_in_errors")  # e.g. secrets
            given = quote(err.get("input"))
            shown = "" if hidden or f"got {given}" in err["msg"] else f" (got {given})"
            lines.append(f"{where}: {path}: {shorten(err['msg'])}{shown}")
    return "\n".join(lines)


def validate_model(model: type[M], data: Mapping[str, Any] | None, where: str) -> M:
    """``model.model_validate(data)``, raising :class:`ConfigError` with readable lines."""
    try:
        return model.model_validate(dict(data or {}))
    except ValidationError as exc:
        raise ConfigError(describe(exc, model, where)) from None
