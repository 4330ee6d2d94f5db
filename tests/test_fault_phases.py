"""A failure never changes the result, end to end: real ``smlt.train`` runs (real Ray, the
scheduler, an embedded Redis, the digits example) with a worker killed (SIGKILL: a crashed
function) or raising at every phase of a step, with SGD + momentum and with Adam, must write a
``model.pt`` bit-identical to the run without the fault; and so must a run in which the platform
delivers a rank's invocation twice at once.

The same interleavings on threads, for more optimizers and with the optimizer state compared
too, are in tests/test_interleavings.py; this file proves the scheduler's side: it notices the
failure, re-invokes the rank at the iteration it had not reported, and the replacement (a fresh
process, after a kill) adopts what the dead one had already published.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import smlt
from smlt.protocol.faults import PHASES

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
# 1347 training samples / 128 = 11 iterations per epoch; one epoch: checkpoints at 5 and 10.
RUN = {"epochs": 1, "batch_size": 128, "workers": 3, "seed": 5, "checkpoint_every": 5}
FAULT_AT = 6  # a during-checkpoint fault fires writing version 10, at the end of iteration 9
ADAM = """

class AdamDigits(Digits):
    def optimizer(self, model):
        return torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=1e-4)
"""


@pytest.fixture(scope="module")
def tasks(in_process_runs: Path) -> dict[str, str]:
    path = in_process_runs / "adam_digits.py"
    path.write_text((REPO / "examples" / "digits.py").read_text() + ADAM)
    return {"sgd": f"{REPO / 'examples' / 'digits.py'}:Digits", "adam": f"{path}:AdamDigits"}


def _train(out: Path, task: str, faults: str, monkeypatch: pytest.MonkeyPatch) -> smlt.TrainResult:
    monkeypatch.setenv("SMLT_FAULTS", faults)
    return smlt.train(task, output=out, heartbeat_timeout_s=5, **RUN)


@pytest.fixture(scope="module")
def clean(in_process_runs: Path, tasks: dict[str, str]) -> dict[str, dict[str, torch.Tensor]]:
    out = {}
    with pytest.MonkeyPatch.context() as patch:
        for name, task in tasks.items():
            result = _train(in_process_runs / f"clean-{name}", task, "", patch)
            out[name] = torch.load(result.model_path)
    return out


def _assert_identical(path: Path, clean: dict[str, torch.Tensor]) -> None:
    got = torch.load(path)
    assert got.keys() == clean.keys()
    for name in got:
        assert torch.equal(got[name], clean[name]), f"{name} differs from the run without faults"


# Every phase with a killed worker (Adam: the most state to lose; its replacement is a new
# process) and with a raising one (SGD with momentum; the process survives, its memory must not
# matter). tests/test_interleavings.py raises at every phase with three optimizers on threads.
CASES = [("adam", "kill", phase) for phase in PHASES] + [("sgd", "raise", p) for p in PHASES]


@pytest.mark.parametrize(("optimizer", "action", "phase"), CASES)
def test_a_fault_at_any_phase_leaves_the_model_bit_identical(
    optimizer: str,
    action: str,
    phase: str,
    in_process_runs: Path,
    tasks: dict[str, str],
    clean: dict[str, dict[str, torch.Tensor]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = in_process_runs / f"{optimizer}-{action}-{phase}"
    fault = f"{action}:rank=1:iteration={FAULT_AT}:phase={phase}"
    result = _train(out, tasks[optimizer], fault, monkeypatch)
    _assert_identical(result.model_path, clean[optimizer])
    failures = [f for f in result.failures if "rank" in f]
    assert [(f["rank"], f["attempt"]) for f in failures] == [(1, 0)], result.failures
    expected = 9 if phase == "during-checkpoint" else FAULT_AT
    assert failures[0]["iteration"] == expected
    # Every iteration is in the history exactly once: nothing before the fault was redone.
    assert [h["iteration"] for h in result.history] == list(range(result.iterations))


def test_a_rank_delivered_twice_at_once_changes_nothing(
    in_process_runs: Path,
    tasks: dict[str, str],
    clean: dict[str, dict[str, torch.Tensor]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    result = _train(
        in_process_runs / "duplicate", tasks["adam"], "duplicate:rank=1:iteration=0", monkeypatch
    )
    _assert_identical(result.model_path, clean["adam"])
