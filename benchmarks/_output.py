"""What every benchmark does with its results: record the command, write JSON, draw the plot."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["command_line", "write_outputs"]


def command_line(module: str, argv: list[str] | None) -> str:
    """The command that produced a result, as a user would type it."""
    return f"python -m {module} " + " ".join(sys.argv[1:] if argv is None else argv)


def write_outputs(
    data: dict[str, Any],
    json_path: Path | None,
    plot_path: Path | None = None,
    plot: Callable[[dict[str, Any], Path], None] | None = None,
) -> None:
    """``data`` as JSON to ``json_path`` (stdout without one), and the plot if asked for."""
    text = json.dumps(data, indent=2)
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(text)
    else:
        print(text)
    if plot_path and plot is not None:
        plot_path.parent.mkdir(parents=True, exist_ok=True)
        plot(data, plot_path)
