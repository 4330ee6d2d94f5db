"""What a run is billed at, as the user says it on the command line.

By default every backend is priced like AWS Lambda x86 (the Ray backend too: a Ray worker is
sized like a function, so its bill says what the same run would cost as functions), and the
parameter store's host is not billed (an embedded Redis runs on the driver's machine). Two
options change that, on ``smlt train`` and ``smlt plan`` alike, and are kept in ``run.json``
so that ``smlt resume`` bills as the run began:

- ``--node-usd-per-hour P`` prices the Ray backend by the node-hour instead: each worker pays
  the share of a node it holds (:class:`~smlt.optimizer.cost.NodeHourPricing`), with the node's
  size from ``--node-vcpus`` and ``--node-memory-mb`` (default: this machine's, which is the
  node of a local Ray);
- ``--store-usd-per-hour S`` bills the store's host for the time the scheduler runs the job
  (a managed Redis, say): the run's wall time less the driver's own start and end.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from smlt.errors import ConfigError
from smlt.optimizer.cost import CostModel, NodeHourPricing, Pricing

__all__ = ["Prices", "machine_memory_mb"]


def machine_memory_mb() -> int:
    """This machine's physical memory in MB (the node of a local Ray)."""
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20)


@dataclass(frozen=True)
class Prices:
    """The user's price options, checked; ``to_dict``/``from_dict`` for ``run.json``."""

    node_usd_per_hour: float | None = None
    node_vcpus: float | None = None
    node_memory_mb: float | None = None
    store_usd_per_hour: float = 0.0

    @classmethod
    def checked(
        cls,
        backend: str,
        *,
        node_usd_per_hour: float | None = None,
        node_vcpus: float | None = None,
        node_memory_mb: float | None = None,
        store_usd_per_hour: float | None = None,
    ) -> Prices:
        """Refuse what cannot apply (node prices off Ray, sizes without a price, negatives),
        fill the node's size from this machine."""
        if store_usd_per_hour is not None and store_usd_per_hour < 0:
            raise ConfigError(f"--store-usd-per-hour must be >= 0, got {store_usd_per_hour}")
        if node_usd_per_hour is None:
            if node_vcpus is not None or node_memory_mb is not None:
                raise ConfigError(
                    "--node-vcpus and --node-memory-mb size the node that --node-usd-per-hour "
                    "prices; give the price too"
                )
            return cls(store_usd_per_hour=store_usd_per_hour or 0.0)
        if backend != "ray":
            raise ConfigError(
                f"--node-usd-per-hour prices a Ray cluster by the node-hour; the {backend} "
                "backend bills by the function's own prices"
            )
        if node_usd_per_hour < 0:
            raise ConfigError(f"--node-usd-per-hour must be >= 0, got {node_usd_per_hour}")
        vcpus = float(node_vcpus if node_vcpus is not None else os.cpu_count() or 1)
        memory_mb = float(node_memory_mb if node_memory_mb is not None else machine_memory_mb())
        if vcpus <= 0 or memory_mb <= 0:
            raise ConfigError(
                f"--node-vcpus and --node-memory-mb must be > 0, got {vcpus:g} and {memory_mb:g}"
            )
        return cls(node_usd_per_hour, vcpus, memory_mb, store_usd_per_hour or 0.0)

    def pricing(self) -> Pricing | None:
        """The workers' pricing the user asked for; None: the backend's own."""
        if self.node_usd_per_hour is None:
            return None
        assert self.node_vcpus is not None and self.node_memory_mb is not None
        return NodeHourPricing(
            name="ray_node_hour",
            usd_per_node_hour=self.node_usd_per_hour,
            node_vcpus=self.node_vcpus,
            node_memory_mb=self.node_memory_mb,
        )

    def backend_options(self) -> dict[str, Any]:
        """What the backend is built with for these prices (``pricing=``, or nothing)."""
        pricing = self.pricing()
        return {} if pricing is None else {"pricing": pricing}

    def costs(self, functions: Pricing) -> CostModel:
        """The cost model of a run on a backend whose own pricing is ``functions``."""
        return CostModel(
            functions=self.pricing() or functions, store_usd_per_hour=self.store_usd_per_hour
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "node_usd_per_hour": self.node_usd_per_hour,
            "node_vcpus": self.node_vcpus,
            "node_memory_mb": self.node_memory_mb,
            "store_usd_per_hour": self.store_usd_per_hour,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Prices:
        """As :meth:`to_dict` wrote it into ``run.json`` (None: a run from before prices)."""
        if not data:
            return cls()
        try:
            return cls(**data)
        except TypeError as exc:
            raise ConfigError(
                f"prices in run.json are not what smlt writes ({data}): {exc}"
            ) from None
