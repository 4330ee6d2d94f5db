"""``smlt emulator``: a local AWS Lambda and Apache OpenWhisk that run the real worker handler.

Neither cloud can be reached from a laptop or from CI, so the ``aws_lambda`` and ``openwhisk``
backends are written against the platforms' documented APIs and tested against this emulator,
which speaks those APIs over real HTTP (boto3 with ``endpoint_url``, httpx for OpenWhisk) and
runs functions in subprocess "containers" with the platforms' behaviour: warm reuse per
function configuration and real cold starts (:mod:`~smlt.emulator.containers`), memory and time
limits enforced by killing the container, concurrency limits answered 429, asynchronous
creation and updates, billed durations. Users can dry-run a deployment against it.

- :mod:`~smlt.emulator.lambda_api`: the Lambda routes (CreateFunction ... Invoke, tags,
  concurrency, event-invoke config); :mod:`~smlt.emulator.lambda_invoke`: what Invoke answers.
- :mod:`~smlt.emulator.openwhisk_api`: actions and activations.
- :mod:`~smlt.emulator.config`: options, and which handler an image runs.
- :mod:`~smlt.emulator.runtime`: the program inside a container.

It is a tool beside the backends: it imports nothing of smlt but :mod:`smlt.errors`, and runs
the worker only by name, in its containers.
"""

from smlt.emulator.config import (
    DEFAULT_LAMBDA_HANDLER,
    DEFAULT_OPENWHISK_HANDLER,
    AwsCredentials,
    EmulatorConfig,
)
from smlt.emulator.containers import ContainerInfo
from smlt.emulator.server import Emulator, EmulatorStatistics, PlatformStatistics

__all__ = [
    "DEFAULT_LAMBDA_HANDLER",
    "DEFAULT_OPENWHISK_HANDLER",
    "AwsCredentials",
    "ContainerInfo",
    "Emulator",
    "EmulatorConfig",
    "EmulatorStatistics",
    "PlatformStatistics",
]
