"""A model too big for one Redis value: 150M parameters with Adam at one worker, end to end.

    python -m benchmarks.big_model --json benchmarks/results/big_model.json

At one worker the owner's parameter shard is the whole model (600 MB) and its Adam state twice
that (1.2 GB in one optimizer-state frame), over Redis's 512 MB limit for one value: the store
splits such values into chunks (``SMLT_MAX_VALUE_BYTES``, 256 MiB). This runs ``smlt.train`` on
a 10,000 x 15,000 linear layer (150,015,000 parameters) for a few iterations exactly as a user
would (Ray backend, embedded Redis, local object store, one checkpoint at the end), then checks
the result against a plain PyTorch loop on the same global batches (at one worker they must be
bit-identical), and records the time of each phase of an iteration and the frames' sizes.

It is a benchmark, not a test, because it needs several GB of memory and minutes on a 2-core
machine; it fails (exit status 1) if the run does not finish or differs from the reference.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import resource
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from benchmarks._output import command_line, write_outputs

__all__ = ["main"]

TASK = textwrap.dedent(
    """
    import torch
    from smlt.task import Task

    class Big(Task):
        IN, OUT, SAMPLES = {inputs}, {outputs}, {samples}

        def data(self):
            g = torch.Generator().manual_seed(0)
            x = torch.randn(self.SAMPLES, self.IN, generator=g)
            return x, torch.randn(self.SAMPLES, self.OUT, generator=g)

        def model(self):
            torch.manual_seed(0)
            return torch.nn.Linear(self.IN, self.OUT)

        def optimizer(self, model):
            return torch.optim.Adam(model.parameters(), lr=1e-3)

        def loss(self, model, batch):
            x, y = batch
            return torch.nn.functional.mse_loss(model(x), y)
    """
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=10_000)
    parser.add_argument("--outputs", type=int, default=15_000)
    parser.add_argument("--samples", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    import torch

    import smlt
    from smlt.backends.base import MB_PER_VCPU
    from smlt.task import load_task
    from tests.reference import reference_state_dict

    folder = Path(tempfile.mkdtemp(prefix="smlt-big-"))
    task_file = folder / "big.py"
    task_file.write_text(
        TASK.format(inputs=args.inputs, outputs=args.outputs, samples=args.samples)
    )
    os.environ.setdefault("SMLT_OBJECT_STORE", str(folder / "objects"))
    began = time.monotonic()
    result = smlt.train(
        f"{task_file}:Big",
        epochs=1,
        batch_size=args.batch_size,
        workers=1,
        output=folder / "run",
        shard_timeout_s=600,
    )
    wall_s = time.monotonic() - began
    got = torch.load(result.model_path)
    memory_mb = result.configs[0]["memory_mb"]
    threads = max(1, math.floor(memory_mb / MB_PER_VCPU))  # what the Ray backend gives a worker
    # The plain PyTorch loop the test suite holds smlt to (tests/reference.py), on the
    # worker's number of threads (CPU reductions depend on it).
    expected = reference_state_dict(
        load_task(f"{task_file}:Big"), epochs=1, batch_size=args.batch_size, seed=0, threads=threads
    )
    identical = all(torch.equal(got[k], expected[k]) for k in expected)
    parameters = sum(v.numel() for v in expected.values())
    history = result.history
    data = {
        "command": command_line("benchmarks.big_model", argv),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "parameters": parameters,
        "workers": 1,
        "memory_mb": memory_mb,
        "worker_threads": threads,
        "param_frame_bytes": parameters * 4,
        "adam_state_bytes": parameters * 8,
        "iterations": len(history),
        "wall_s": wall_s,
        "iterations_s": [h["iter_s"] for h in history],
        "phases_s": {
            name: [h.get(name, 0.0) for h in history]
            for name in ("compute_s", "update_s", "codec_s", "sync_s", "data_s")
        },
        "bit_identical_to_plain_pytorch": identical,
        "driver_max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }
    write_outputs(data, args.json)
    return 0 if identical and len(history) == result.iterations else 1


if __name__ == "__main__":
    sys.exit(main())
