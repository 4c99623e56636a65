"""The ``kvtier serve`` and ``kvtier top`` commands (their dependencies are imported when
they run, so ``kvtier --help`` stays fast and says which extra is missing)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from kvtier.core.errors import MissingExtraError


def _need(feature: str, extra: str, *modules: str) -> None:
    import importlib

    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise MissingExtraError(feature, extra, exc) from None


def serve(
    config: Annotated[Path, typer.Option("--config", help="YAML config file (its tiers).")],
    host: Annotated[
        str | None, typer.Option(help="Address to bind (default: ops.serve.host, 127.0.0.1).")
    ] = None,
    port: Annotated[
        int | None, typer.Option(min=0, max=65535, help="Port (default: ops.serve.port, 8790).")
    ] = None,
    token_file: Annotated[
        Path | None,
        typer.Option("--token-file", help="File holding the bearer token (else $KVTIER_TOKEN)."),
    ] = None,
) -> int:
    """Run the HTTP control service: health, metrics, stats, lookup, admin purge."""
    _need("kvtier serve", "serve", "starlette", "uvicorn")
    import uvicorn

    from kvtier.core.config import load_config
    from kvtier.plugins.ops.auth import check_bind, load_token
    from kvtier.plugins.ops.service import Service

    cfg = load_config(config)
    token = load_token(token_file)
    bind = host or cfg.ops.serve.host
    check_bind(bind, token)
    service = Service(cfg, token)
    auth = "token required" if token else "no token: admin endpoints off"
    print(f"kvtier serve: http://{bind}:{port or cfg.ops.serve.port} ({auth})", file=sys.stderr)
    uvicorn.run(
        service.app,
        host=bind,
        port=cfg.ops.serve.port if port is None else port,
        log_level="warning",
    )
    return 0


def top(
    url: Annotated[str, typer.Argument(help="URL of a running kvtier serve.")],
    token_file: Annotated[
        Path | None,
        typer.Option("--token-file", help="File holding the bearer token (else $KVTIER_TOKEN)."),
    ] = None,
    interval: Annotated[float, typer.Option(min=0.1, help="Seconds between refreshes.")] = 1.0,
    once: Annotated[bool, typer.Option("--once", help="Print one screen and exit.")] = False,
) -> int:
    """Live dashboard of a running service: hit rates per tier and tenant, bytes, latency."""
    _need("kvtier top", "serve", "httpx", "prometheus_client")
    from kvtier.plugins.ops.auth import load_token
    from kvtier.plugins.ops.top import run_top

    return run_top(url, load_token(token_file), interval=interval, once=once)
