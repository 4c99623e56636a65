"""The ``kvtier demo`` command, given to the ``kvtier`` CLI through ``kvtier_subcommands``.

Registered in the ``kvtier`` entry-point group (see ``pyproject.toml``). The CLI
imports this module each time it starts, so it imports neither transformers nor the
demo: they are imported when the command runs, and a missing ``[demo]`` extra is then
one line naming ``pip install 'kvtier[demo]'``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from kvtier.core.errors import ConfigError
from kvtier.core.hookspecs import hookimpl
from kvtier.core.specs import SubcommandSpec
from kvtier.plugins.transformers import require_extra


def _token_counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(part) for part in text.split(","))
    except ValueError:
        counts = ()
    if not counts or min(counts) < 1:
        raise ConfigError(f"--contexts {text!r}: give token counts like 1024,2048,4096")
    return counts


def demo(
    config: Annotated[
        Path | None, typer.Option(help="Tier-chain YAML (default: embedded).")
    ] = None,
    model: Annotated[
        str,
        typer.Option(
            help="smollm2 (pretrained SmolLM2-135M-Instruct, text in and out), or a "
            "random-weight Llama: 125m, or tiny for a quick check."
        ),
    ] = "smollm2",
    users: Annotated[int, typer.Option(min=1, help="Chat users.")] = 3,
    turns: Annotated[int, typer.Option(min=1, help="Chat turns per user.")] = 4,
    contexts: Annotated[
        str, typer.Option(help="Context lengths of the TTFT sweep, comma-separated.")
    ] = "1024,2048,4096",
    plot: Annotated[
        Path | None,
        typer.Option(help="Write a PNG plot of TTFT vs context to this file (default: none)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the weights and prompts.")] = 0,
) -> int:
    """Run chat and RAG workloads on a real model with and without kvtier; print TTFT."""
    counts = _token_counts(contexts)
    require_extra("kvtier demo", "transformers", *(("matplotlib",) if plot else ()))
    from kvtier.core.cli import console
    from kvtier.plugins.transformers.demo import DemoSettings, run_demo

    settings = DemoSettings(model=model, users=users, turns=turns, contexts=counts, plot=plot,
                            seed=seed)  # fmt: skip
    result = run_demo(config, settings, console=console)
    if result.lossless and result.mismatches:
        print(
            f"kvtier: error: reused KV changed the next token of {len(result.mismatches)} "
            "requests, although every tier's codec is lossless",
            file=sys.stderr,
        )
        return 1
    return 0


@hookimpl
def kvtier_subcommands() -> list[SubcommandSpec]:
    return [SubcommandSpec(name="demo", callback=demo)]
