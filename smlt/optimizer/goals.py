"""What the user asks for: a deadline, a budget, or the fastest run (the paper's eq. 1).

Each goal is one objective under at most one constraint:

=================  ====================  ==========================
goal               minimise              subject to
=================  ====================  ==========================
``Deadline(T)``    cost                  predicted wall time <= T
``Budget(S)``      wall time             predicted cost <= S
``Fastest()``      wall time             (nothing)
=================  ====================  ==========================

An :class:`Override` of workers and/or memory wins over any goal: the optimizer searches only
the dimension the user left open, and with both given it does not search at all.

The parsers turn command-line text (``--deadline 30m``, ``--budget 0.50``) into numbers and
refuse bad text with a :class:`~smlt.errors.ConfigError` that names the flag, so the CLI needs no
validation of its own.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from smlt.errors import ConfigError

__all__ = [
    "Budget",
    "Deadline",
    "Fastest",
    "Goal",
    "Override",
    "format_duration",
    "goal_from_options",
    "parse_duration_s",
    "parse_usd",
]

Objective = Literal["cost_usd", "time_s"]


@dataclass(frozen=True)
class Deadline:
    """Finish within ``time_s`` seconds of wall time (start-up and trials included), as
    cheaply as possible."""

    time_s: float
    kind: ClassVar[str] = "deadline"
    objective: ClassVar[Objective] = "cost_usd"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.time_s) and self.time_s > 0):
            raise ConfigError(f"a deadline must be a positive duration, got {self.time_s} s")

    @property
    def time_limit_s(self) -> float | None:
        return self.time_s

    @property
    def cost_limit_usd(self) -> float | None:
        return None

    def met(self, time_s: float, cost_usd: float) -> bool:
        return time_s <= self.time_s

    def to_dict(self) -> dict[str, Any]:
        return {"goal": self.kind, "time_s": self.time_s}

    def __str__(self) -> str:
        return f"deadline {format_duration(self.time_s)}"


@dataclass(frozen=True)
class Budget:
    """Spend at most ``cost_usd`` (trials included), finishing as soon as possible."""

    cost_usd: float
    kind: ClassVar[str] = "budget"
    objective: ClassVar[Objective] = "time_s"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.cost_usd) and self.cost_usd > 0):
            raise ConfigError(f"a budget must be a positive amount, got ${self.cost_usd}")

    @property
    def time_limit_s(self) -> float | None:
        return None

    @property
    def cost_limit_usd(self) -> float | None:
        return self.cost_usd

    def met(self, time_s: float, cost_usd: float) -> bool:
        return cost_usd <= self.cost_usd

    def to_dict(self) -> dict[str, Any]:
        return {"goal": self.kind, "cost_usd": self.cost_usd}

    def __str__(self) -> str:
        return f"budget ${self.cost_usd:g}"


@dataclass(frozen=True)
class Fastest:
    """Finish as soon as possible, whatever it costs."""

    kind: ClassVar[str] = "fastest"
    objective: ClassVar[Objective] = "time_s"

    @property
    def time_limit_s(self) -> float | None:
        return None

    @property
    def cost_limit_usd(self) -> float | None:
        return None

    def met(self, time_s: float, cost_usd: float) -> bool:
        return True

    def to_dict(self) -> dict[str, Any]:
        return {"goal": self.kind}

    def __str__(self) -> str:
        return "fastest"


Goal = Deadline | Budget | Fastest


@dataclass(frozen=True)
class Override:
    """Workers and/or memory the user fixed (``--workers``, ``--memory-mb``); None: free."""

    workers: int | None = None
    memory_mb: int | None = None

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"--workers must be at least 1, got {self.workers}")
        if self.memory_mb is not None and self.memory_mb < 1:
            raise ConfigError(f"--memory-mb must be positive, got {self.memory_mb}")

    @property
    def fixed(self) -> bool:
        """Both given: there is nothing to search."""
        return self.workers is not None and self.memory_mb is not None

    def to_dict(self) -> dict[str, int | None]:
        return {"workers": self.workers, "memory_mb": self.memory_mb}


# -- parsing -----------------------------------------------------------------------------------

_UNIT_S = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([smhd])", re.IGNORECASE)


def parse_duration_s(text: str, *, flag: str = "--deadline") -> float:
    """Seconds in ``text``: ``90s``, ``30m``, ``1.5h``, ``1h30m``, ``2d``; a bare number is
    seconds (as for ``sleep``). Raises ConfigError naming ``flag`` for anything else."""
    spec = text.strip()
    bad = ConfigError(
        f"{flag} {text!r}: expected a positive duration such as 90s, 30m, 1h30m or 2h"
    )
    if not spec:
        raise bad
    try:
        seconds = float(spec)
    except ValueError:
        parts = _DURATION.findall(spec)
        if not parts or _DURATION.sub("", spec).strip():
            raise bad from None
        seconds = sum(float(number) * _UNIT_S[unit.lower()] for number, unit in parts)
    if not (math.isfinite(seconds) and seconds > 0):
        raise bad
    return seconds


def parse_usd(text: str, *, flag: str = "--budget") -> float:
    """Dollars in ``text``: ``0.50``, ``$0.50``, ``12``. Raises ConfigError naming ``flag``."""
    spec = text.strip().removeprefix("$").strip()
    try:
        usd = float(spec)
    except ValueError:
        raise ConfigError(
            f"{flag} {text!r}: expected a positive amount in US dollars such as 0.50"
        ) from None
    if not (math.isfinite(usd) and usd > 0):
        raise ConfigError(f"{flag} {text!r}: the amount must be positive")
    return usd


def goal_from_options(
    *, deadline: str | None = None, budget: str | None = None, fastest: bool = False
) -> Goal | None:
    """The goal the command line asked for, or None (fixed ``--workers``/``--memory-mb``).

    At most one of the three may be given: a deadline and a budget together over-determine the
    problem (one of them would be ignored without the user knowing which)."""
    given = [
        name
        for name, value in (("--deadline", deadline), ("--budget", budget), ("--fastest", fastest))
        if value
    ]
    if len(given) > 1:
        raise ConfigError(f"give at most one of --deadline, --budget, --fastest (got {given})")
    if deadline is not None:
        return Deadline(parse_duration_s(deadline, flag="--deadline"))
    if budget is not None:
        return Budget(parse_usd(budget, flag="--budget"))
    if fastest:
        return Fastest()
    return None


def format_duration(seconds: float) -> str:
    """``5400`` -> ``1h30m``; ``95`` -> ``1m35s``: how a goal is shown back to the user."""
    if seconds < 60:
        return f"{seconds:g}s"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    text = (f"{hours}h" if hours else "") + (f"{minutes}m" if minutes else "")
    return text + (f"{secs}s" if secs else "")
