"""How many Lambda-shaped workers a Ray cluster can hold: pure arithmetic, no Ray import.

A worker of ``memory_mb`` asks Ray for ``memory_mb / 1769`` CPUs (Lambda's rule) and
``memory_mb`` MiB of Ray's ``memory`` resource. Ray books resources in fixed point with four
decimals, so CPU shares are counted here in integer *units* of 1/10,000 CPU, rounded down: the
same number Ray books, and exact comparisons instead of float ones (4 x 884 MB is 1.9988 CPUs,
a hair under 2; 4 x 885 MB is over).

A worker (one placement-group bundle) must fit on one node. Identical bundles pack exactly by
counting: node i holds ``min(cpu_i // share, memory_i // bytes)`` of them.

The arithmetic uses the nodes' sizes, not their momentary free room: Ray's "available" view
lags a released placement group by up to a second, so a re-deploy would see its own old group
still holding the cluster. Room held by other jobs shows up instead as the placement group's
bounded wait running out (``deploy`` then raises ``CapacityError`` too).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from smlt.backends.base import MB_PER_VCPU

__all__ = ["CPU_UNITS", "ClusterCapacity", "NodeCapacity", "cpu_share", "cpu_units_for"]

#: Ray's resource resolution: 1 CPU = 10,000 units.
CPU_UNITS = 10_000
_MIB = 2**20


def cpu_units_for(memory_mb: int) -> int:
    """CPU share of a worker of ``memory_mb``, in 1/10,000 CPU, rounded down (at least 1)."""
    return max(1, memory_mb * CPU_UNITS // MB_PER_VCPU)


def cpu_share(memory_mb: int) -> float:
    """CPU share of a worker of ``memory_mb`` as Ray's ``num_cpus`` (e.g. 884 MB -> 0.4997)."""
    return cpu_units_for(memory_mb) / CPU_UNITS


@dataclass(frozen=True)
class NodeCapacity:
    """One alive node's total CPUs (in units) and ``memory`` resource (bytes)."""

    cpu_units: int
    memory_bytes: int

    def holds(self, memory_mb: int) -> int:
        """How many workers of ``memory_mb`` this node holds when empty."""
        by_cpu = self.cpu_units // cpu_units_for(memory_mb)
        return min(by_cpu, self.memory_bytes // (memory_mb * _MIB))


@dataclass(frozen=True)
class ClusterCapacity:
    """The cluster's alive nodes, and how many workers of a size they hold."""

    nodes: tuple[NodeCapacity, ...]

    @classmethod
    def of(cls, nodes: Sequence[tuple[float, float]]) -> ClusterCapacity:
        """From Ray's numbers: each node's (CPUs, ``memory`` resource in bytes)."""
        return cls(tuple(NodeCapacity(round(c * CPU_UNITS), int(m)) for c, m in nodes))

    @property
    def cpus(self) -> float:
        return sum(n.cpu_units for n in self.nodes) / CPU_UNITS

    @property
    def memory_gb(self) -> float:
        return sum(n.memory_bytes for n in self.nodes) / 2**30

    def max_workers(self, memory_mb: int) -> int:
        """How many workers of ``memory_mb`` fit at once."""
        return sum(node.holds(memory_mb) for node in self.nodes)

    def fits(self, workers: int, memory_mb: int) -> bool:
        return self.max_workers(memory_mb) >= workers

    def largest_memory_mb(self, workers: int, lo_mb: int, hi_mb: int) -> int | None:
        """The largest memory in [lo_mb, hi_mb] at which ``workers`` fit; None if not even lo_mb.

        Fitting only gets harder as memory grows, so a binary search over whole MB is exact.
        """
        if hi_mb < lo_mb or not self.fits(workers, lo_mb):
            return None
        while lo_mb < hi_mb:
            mid = (lo_mb + hi_mb + 1) // 2
            if self.fits(workers, mid):
                lo_mb = mid
            else:
                hi_mb = mid - 1
        return lo_mb

    def explain(self, workers: int, memory_mb: int, min_mb: int, max_mb: int) -> str:
        """Why ``workers`` x ``memory_mb`` does not fit, and what would."""
        need_cpus = workers * cpu_units_for(memory_mb) / CPU_UNITS
        need_gb = workers * memory_mb / 1024
        plural = "s" if workers != 1 else ""
        message = (
            f"{workers} worker{plural} x {memory_mb} MB need {need_cpus:.1f} CPUs and "
            f"{need_gb:.1f} GB; this cluster has {self.cpus:g} CPUs and {self.memory_gb:.1f} GB"
        )
        largest_node = max((n.cpu_units for n in self.nodes), default=0)
        if cpu_units_for(memory_mb) > largest_node:
            message += (
                f" (one worker of {memory_mb} MB needs {cpu_share(memory_mb):.2f} CPUs, "
                f"the largest node has {largest_node / CPU_UNITS:g})"
            )
        options = []
        same_workers = self.largest_memory_mb(workers, min_mb, max_mb)
        if same_workers is not None:
            options.append(f"{workers} worker{plural} x {same_workers} MB")
        same_memory = self.max_workers(memory_mb)
        if same_memory >= 1:
            many = "s" if same_memory != 1 else ""
            options.append(f"{same_memory} worker{many} x {memory_mb} MB")
        elif (single := self.largest_memory_mb(1, min_mb, max_mb)) is not None:
            options.append(f"1 worker x {single} MB")
        if options:
            return f"{message}: at most {' or '.join(options)}"
        return f"{message}: not even one worker of {min_mb} MB fits"
