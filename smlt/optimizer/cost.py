"""What a run costs: the one place in smlt that knows prices.

A serverless bill has three parts that scale differently, and the optimizer has to see all of
them to trade workers against memory honestly:

- **workers**: GB-seconds. Lambda bills memory x duration per 1 ms, so doubling the memory
  doubles the price per second, and (because CPU comes with memory, 1,769 MB per vCPU) can
  halve the compute time: for compute-bound work the bill is flat in memory, and only the part
  of an iteration that memory does not speed up (communication) makes big functions dear;
- **requests**: a fee per invocation (a worker is re-invoked at every generation boundary)
  plus the object store's fee per PUT and GET (checkpoints, restarts);
- **store**: the parameter store's host, paid by the hour while the run lasts, however many
  workers use it.

:class:`Pricing` prices one worker; :class:`CostModel` adds the store and the object store and
predicts or totals a whole run as a :class:`CostBreakdown`, which is what ``result.json``
records. The backends get their ``pricing`` from here (``smlt.backends.base`` re-exports
:class:`Pricing` and :data:`LAMBDA_X86`), so the scheduler's running total and the optimizer's
predictions come from one price table.

Every price below names its source and the date it was read. ``platform-facts.md`` (the
project's reference) is the source where it has the number; where it does not, the comment says
so and names where the number comes from instead. Recheck before relying on a bill.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from smlt.errors import ConfigError

__all__ = [
    "IBM_CLOUD_FUNCTIONS",
    "LAMBDA_ARM64",
    "LAMBDA_X86",
    "MAX_VCPUS",
    "MB_PER_GB",
    "MB_PER_VCPU",
    "S3_STANDARD",
    "CostBreakdown",
    "CostModel",
    "FunctionPricing",
    "NodeHourPricing",
    "ObjectStorePricing",
    "Pricing",
    "vcpus",
]

#: Lambda bills memory in GB of 1,024 MB ("128 MB = 0.125 GB" in AWS's own examples).
MB_PER_GB = 1024
#: Lambda's memory-to-CPU rule: 1,769 MB buys one vCPU, proportionally, up to 6 vCPUs
#: (platform-facts.md, from the AWS Lambda docs "Configuring function memory").
MB_PER_VCPU = 1769
MAX_VCPUS = 6.0


def vcpus(memory_mb: Any) -> Any:
    """vCPUs a function of ``memory_mb`` gets (fractions below 1,769 MB: a time share).

    Accepts a number or a numpy array, so the optimizer can price a whole grid at once."""
    return np.minimum(np.asarray(memory_mb, dtype=float) / MB_PER_VCPU, MAX_VCPUS)


class Pricing(ABC):
    """The price of one worker: per second at a memory size, and per invocation.

    Two shapes exist: :class:`FunctionPricing` (serverless, GB-seconds plus a request fee) and
    :class:`NodeHourPricing` (a Ray cluster's nodes by the hour, each worker paying its share).
    """

    name: str

    @abstractmethod
    def usd_per_worker_s(self, memory_mb: Any) -> Any:
        """USD per second of one worker of ``memory_mb`` (number or array), before rounding."""

    @abstractmethod
    def compute_usd(self, memory_mb: int, billed_s: float) -> float:
        """The duration part of one invocation's bill, rounded as the platform rounds."""

    @abstractmethod
    def requests_usd(self, requests: int) -> float:
        """The per-invocation fees of ``requests`` invocations."""

    @abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """The prices as recorded in ``result.json``."""

    def cost_usd(self, memory_mb: int, billed_s: float, requests: int = 1) -> float:
        """Cost of ``requests`` invocations of ``memory_mb`` running ``billed_s`` in total.

        This is the scheduler's running total per ended invocation (``requests=1``) and per
        still-running one (``requests=0``)."""
        return self.compute_usd(memory_mb, billed_s) + self.requests_usd(requests)


@dataclass(frozen=True)
class FunctionPricing(Pricing):
    """A serverless platform's price: GB-seconds rounded up to ``billing_granularity_s`` per
    invocation, plus a fee per request."""

    name: str
    usd_per_gb_s: float
    usd_per_request: float
    billing_granularity_s: float = 0.001
    source: str = ""

    def usd_per_worker_s(self, memory_mb: Any) -> Any:
        return np.asarray(memory_mb, dtype=float) / MB_PER_GB * self.usd_per_gb_s

    def compute_usd(self, memory_mb: int, billed_s: float) -> float:
        step = self.billing_granularity_s
        rounded_s = math.ceil(billed_s / step - 1e-9) * step if step > 0 else billed_s
        return memory_mb / MB_PER_GB * max(rounded_s, 0.0) * self.usd_per_gb_s

    def requests_usd(self, requests: int) -> float:
        return requests * self.usd_per_request

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "usd_per_gb_s": self.usd_per_gb_s,
            "usd_per_request": self.usd_per_request,
            "billing_granularity_s": self.billing_granularity_s,
            "source": self.source,
        }


@dataclass(frozen=True)
class NodeHourPricing(Pricing):
    """A Ray cluster priced by the node-hour: each worker pays the share of a node it holds.

    A worker of ``memory_mb`` holds ``memory_mb / 1769`` CPUs and ``memory_mb`` of memory (the
    Ray backend's Lambda-shaped request); its share is the larger of the two fractions of a
    node. Idle capacity is not charged to the run: if the cluster exists only for this run,
    size it to the run, or the bill will exceed this estimate. No node price is in
    platform-facts.md, so there is no default: the user gives it."""

    name: str
    usd_per_node_hour: float
    node_vcpus: float
    node_memory_mb: float
    source: str = "given by the user"

    def __post_init__(self) -> None:
        if self.usd_per_node_hour < 0 or self.node_vcpus <= 0 or self.node_memory_mb <= 0:
            raise ConfigError(f"{self.name}: node price must be >= 0 and node sizes > 0")

    def _share(self, memory_mb: Any) -> Any:
        mb = np.asarray(memory_mb, dtype=float)
        return np.maximum(mb / MB_PER_VCPU / self.node_vcpus, mb / self.node_memory_mb)

    def usd_per_worker_s(self, memory_mb: Any) -> Any:
        return self._share(memory_mb) * self.usd_per_node_hour / 3600

    def compute_usd(self, memory_mb: int, billed_s: float) -> float:
        return float(self.usd_per_worker_s(memory_mb)) * max(billed_s, 0.0)

    def requests_usd(self, requests: int) -> float:
        return 0.0  # a Ray task has no invocation fee

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "usd_per_node_hour": self.usd_per_node_hour,
            "node_vcpus": self.node_vcpus,
            "node_memory_mb": self.node_memory_mb,
            "source": self.source,
        }


# -- prices ------------------------------------------------------------------------------------

#: AWS Lambda x86, us-east-1: $0.0000166667 per GB-s, $0.20 per 1M requests, billed per 1 ms.
#: Source: platform-facts.md ("AWS Lambda pricing"), read 2026. The Ray backend is priced like
#: this by default, so a laptop run says what the same run would cost on Lambda.
LAMBDA_X86 = FunctionPricing(
    "aws_lambda_x86",
    usd_per_gb_s=0.0000166667,
    usd_per_request=0.20e-6,
    source="platform-facts.md: AWS Lambda pricing, us-east-1 (read 2026)",
)
#: AWS Lambda arm64 (Graviton), us-east-1: $0.0000133334 per GB-s, same request fee and 1 ms
#: billing. Source: platform-facts.md ("AWS Lambda pricing"), read 2026.
LAMBDA_ARM64 = FunctionPricing(
    "aws_lambda_arm64",
    usd_per_gb_s=0.0000133334,
    usd_per_request=0.20e-6,
    source="platform-facts.md: AWS Lambda pricing, us-east-1 (read 2026)",
)
#: OpenWhisk as IBM Cloud Functions priced it: $0.000017 per GB-s, duration rounded up to
#: 100 ms, no per-request fee. NOT in platform-facts.md. Sources: IBM's Bluemix OpenWhisk
#: pricing page as quoted by the Serverless Framework's OpenWhisk guide (2017,
#: docs/providers/openwhisk/guide/credentials.md) and apache/openwhisk docs/README.md
#: ("rounded up to the nearest 100ms", "per request (not supported on OpenWhisk yet)"); read
#: 2026. IBM deprecated Cloud Functions (no new actions after 2023-12-28), so this prices a
#: self-hosted OpenWhisk as the last public offer did; give your operator's price if it has one.
IBM_CLOUD_FUNCTIONS = FunctionPricing(
    "ibm_cloud_functions",
    usd_per_gb_s=0.000017,
    usd_per_request=0.0,
    billing_granularity_s=0.1,
    source="IBM Cloud Functions list price (not in platform-facts.md; see smlt/optimizer/cost.py)",
)


@dataclass(frozen=True)
class ObjectStorePricing:
    """Fees per object-store request (checkpoint shards written, read back at a restart)."""

    name: str
    usd_per_put: float
    usd_per_get: float
    source: str = ""

    def requests_usd(self, puts: int, gets: int) -> float:
        return puts * self.usd_per_put + gets * self.usd_per_get

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "usd_per_put": self.usd_per_put,
            "usd_per_get": self.usd_per_get,
            "source": self.source,
        }


#: Amazon S3 Standard, us-east-1: $0.005 per 1,000 PUT/COPY/POST/LIST, $0.0004 per 1,000 GET.
#: NOT in platform-facts.md: AWS's S3 pricing page (aws.amazon.com/s3/pricing) as quoted in
#: public cost write-ups, read 2026. Storage per GB-month is not charged here: smlt keeps only
#: the newest checkpoints for the length of a run, which costs far less than a cent.
S3_STANDARD = ObjectStorePricing(
    "aws_s3_standard",
    usd_per_put=0.005 / 1000,
    usd_per_get=0.0004 / 1000,
    source="AWS S3 pricing, us-east-1 (not in platform-facts.md; see smlt/optimizer/cost.py)",
)


# -- a run's bill ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CostBreakdown:
    """A run's cost by what it paid for, in USD.

    ``total_usd`` is ``workers_usd + store_usd + requests_usd``. ``trials_usd`` is the part of
    that total spent in the optimizer's trial configurations: profiling *is* training, so it is
    included in the three, not added to them (it says how much the search cost, not an extra).
    """

    workers_usd: float = 0.0
    store_usd: float = 0.0
    requests_usd: float = 0.0
    trials_usd: float = 0.0

    @property
    def total_usd(self) -> float:
        return self.workers_usd + self.store_usd + self.requests_usd

    def __add__(self, other: CostBreakdown) -> CostBreakdown:
        return CostBreakdown(
            self.workers_usd + other.workers_usd,
            self.store_usd + other.store_usd,
            self.requests_usd + other.requests_usd,
            self.trials_usd + other.trials_usd,
        )

    def as_trial(self) -> CostBreakdown:
        """The same bill, counted as spent on a trial."""
        return CostBreakdown(self.workers_usd, self.store_usd, self.requests_usd, self.total_usd)

    def to_dict(self) -> dict[str, float]:
        return {
            "workers_usd": self.workers_usd,
            "store_usd": self.store_usd,
            "requests_usd": self.requests_usd,
            "trials_usd": self.trials_usd,
            "total_usd": self.total_usd,
        }


@dataclass(frozen=True)
class CostModel:
    """Prices of everything a run pays for: the workers, the parameter store's host, the object
    store's requests.

    ``store_usd_per_hour`` is 0 by default, meaning the store's host is not billed to the run
    (the embedded Redis on the driver's machine). No host price is in platform-facts.md; for a
    managed store give its hourly price (an ElastiCache node, say) and it is charged for the
    time the scheduler runs the job, however many workers use it.
    """

    functions: Pricing = LAMBDA_X86
    store_usd_per_hour: float = 0.0
    objects: ObjectStorePricing = field(default=S3_STANDARD)

    def __post_init__(self) -> None:
        if self.store_usd_per_hour < 0:
            raise ConfigError(f"store_usd_per_hour must be >= 0, got {self.store_usd_per_hour}")

    @property
    def store_usd_per_s(self) -> float:
        return self.store_usd_per_hour / 3600

    def bill(
        self,
        invocations: list[tuple[int, float]],
        *,
        wall_s: float,
        puts: int = 0,
        gets: int = 0,
    ) -> CostBreakdown:
        """What a finished run paid: ``invocations`` is ``(memory_mb, billed_s)`` per ended
        invocation (each rounded as the platform rounds it and charged one request)."""
        workers_usd = sum(self.functions.compute_usd(m, s) for m, s in invocations)
        requests_usd = self.functions.requests_usd(len(invocations))
        requests_usd += self.objects.requests_usd(puts, gets)
        return CostBreakdown(workers_usd, self.store_usd_per_s * wall_s, requests_usd)

    def predict(
        self,
        workers: int,
        memory_mb: int,
        *,
        wall_s: float,
        invocations: int,
        puts: int = 0,
        gets: int = 0,
    ) -> CostBreakdown:
        """What ``workers`` x ``memory_mb`` will pay for ``wall_s`` of wall time, every worker
        billed for all of it (start-up included) over ``invocations`` invocations in all.

        Per-invocation rounding is ignored (at most 1 ms, or 100 ms on OpenWhisk, per
        invocation): a prediction, not a bill."""
        workers_usd = workers * float(self.functions.usd_per_worker_s(memory_mb)) * wall_s
        requests_usd = self.functions.requests_usd(invocations)
        requests_usd += self.objects.requests_usd(puts, gets)
        return CostBreakdown(workers_usd, self.store_usd_per_s * wall_s, requests_usd)

    def usd_per_s(self, workers: Any, memory_mb: Any) -> Any:
        """USD per second of wall time of ``workers`` x ``memory_mb`` (numbers or arrays): the
        workers plus the store. The optimizer prices its whole grid with this."""
        workers_a = np.asarray(workers, dtype=float)
        return workers_a * self.functions.usd_per_worker_s(memory_mb) + self.store_usd_per_s

    def to_dict(self) -> dict[str, Any]:
        return {
            "functions": self.functions.to_dict(),
            "store_usd_per_hour": self.store_usd_per_hour,
            "objects": self.objects.to_dict(),
        }
