"""Request bodies and error answers of ``kvtier serve``."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict
from starlette.responses import JSONResponse


class Body(BaseModel):
    """A JSON request body: unknown fields are errors."""

    model_config = ConfigDict(extra="forbid")


def error(status: int, message: str, **extra: Any) -> JSONResponse:
    """``{"error": message, ...}`` with ``status`` (401 says which scheme to use)."""
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)
