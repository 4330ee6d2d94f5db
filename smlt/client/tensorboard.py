"""TensorBoard event files of a run: ``--tensorboard DIR``, ``smlt.train(..., tensorboard=DIR)``.

The run's events go to ``DIR/JOB`` (its job id), so that ``tensorboard --logdir DIR`` shows each
run as a run of its own, side by side, and a resume of the run writes to the same folder. The
writer is a :class:`~smlt.client.callbacks.Callback` like any other, fed the same records.

Scalars, per iteration (step = the iteration, from 0, so every part of a resumed run writes on
one step axis):

- ``train/loss``, ``train/lr``, ``train/grad_norm`` (the global norm before clipping, whether
  or not the task clips), ``train/samples_per_s``;
- ``cost/usd``: the whole run's cost so far, as of when the driver saw the iteration;
- ``time/<phase>_s``: every duration of the history entry (``data_s``, ``compute_s``,
  ``sync_s``, ``update_s``, ``iter_s``, ...; all its ``*_s`` fields but ``wall_s``, the time
  since the run started, which is TensorBoard's own relative time axis).

Per epoch, at the step of the epoch's last iteration (so that ``eval/`` curves line up with
``train/loss`` on the same axis; ``result.json``'s epochs carry the same ``iteration``):

- ``epoch/train_loss``: as ``result.json`` has it, the loss of the epoch's last iteration;
- ``eval/<name>``: each metric of ``evaluate()``, by its name.

Values are float32, as TensorBoard's scalars are (``result.json`` has the float64s).

Each step is written once. A resumed run first reads the steps its folder already holds (with
TensorBoard's own reader) and writes only the others: the iterations a stopped part did after
its last checkpoint are not written again (they are done again with the same loss and learning
rate, bit for bit; smlt's promise on a resume). At a successful end the writer also fills in any
step of the run's record that is missing, such as the last ones of a part killed with SIGKILL
before they were flushed (at most :data:`FLUSH_S` seconds' worth).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from smlt.client.callbacks import Callback
from smlt.client.record import EPOCH_FIELDS
from smlt.errors import ConfigError

if TYPE_CHECKING:
    from smlt.client.driver import TrainResult

__all__ = [
    "FLUSH_S",
    "INSTALL_HINT",
    "TensorBoardWriter",
    "epoch_scalars",
    "iteration_scalars",
    "require_tensorboard",
    "run_log_dir",
]

INSTALL_HINT = "pip install 'smlt[tensorboard]'"
#: How often written events reach the file (TensorBoard's writer flushes on a thread of its own).
FLUSH_S = 2.0
#: The tags whose steps tell which iterations and epochs a folder already holds: written for
#: every record.
_ITERATION_TAG = "train/loss"
_EPOCH_TAG = "epoch/train_loss"
_ITERATION_TAGS = {
    "loss": _ITERATION_TAG,
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "samples_per_s": "train/samples_per_s",
    "cost_usd": "cost/usd",
}
#: ``*_s`` fields of a history entry that are not durations of the iteration.
_NOT_PHASES = frozenset({"wall_s", "samples_per_s"})


def require_tensorboard(log_root: str | Path) -> Path:
    """``log_root`` as a path, once tensorboard is known to be importable and the path can be a
    folder: checked before a run starts, so a missing package costs seconds, not a run."""
    try:
        import tensorboard  # noqa: F401  (the check; the writer imports what it uses)
    except ImportError:
        raise ConfigError(
            "--tensorboard (tensorboard=) needs the tensorboard package, which is not "
            f"installed: {INSTALL_HINT}"
        ) from None
    root = Path(log_root).expanduser()
    if root.exists() and not root.is_dir():
        raise ConfigError(f"--tensorboard {log_root}: it is a file; give a folder")
    return root


def run_log_dir(log_root: str | Path, job_id: str) -> Path:
    """Where the events of run ``job_id`` go: a folder per run under ``log_root``."""
    return Path(log_root).expanduser() / job_id


def iteration_scalars(record: dict[str, Any]) -> dict[str, float]:
    """The scalars of one history entry, by tag."""
    scalars = {}
    for name, tag in _ITERATION_TAGS.items():
        if (value := _number(record.get(name))) is not None:
            scalars[tag] = value
    for name, raw in record.items():
        if name.endswith("_s") and name not in _NOT_PHASES and (value := _number(raw)) is not None:
            scalars[f"time/{name}"] = value
    return scalars


def epoch_scalars(record: dict[str, Any]) -> dict[str, float]:
    """The scalars of one epoch's entry, by tag: its training loss and ``evaluate()``'s
    metrics (an epoch that was never evaluated has only the former)."""
    scalars = {}
    if (loss := _number(record.get("train_loss"))) is not None:
        scalars[_EPOCH_TAG] = loss
    for name, raw in record.items():
        if name not in EPOCH_FIELDS and (value := _number(raw)) is not None:
            scalars[f"eval/{name}"] = value
    return scalars


def _number(value: Any) -> float | None:
    """``value`` as a float if it is a number (a flag is not)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


class TensorBoardWriter(Callback):
    """Writes a run's records to ``log_dir`` as TensorBoard scalars; the module docstring lists
    the tags and steps."""

    def __init__(self, log_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # tensorboard there but broken, or too old for torch
            raise ConfigError(
                f"--tensorboard: torch.utils.tensorboard cannot be imported ({exc}): {INSTALL_HINT}"
            ) from None
        self.log_dir = Path(log_dir)
        self._iterations, self._epochs = written_steps(self.log_dir)
        self._writer = SummaryWriter(str(self.log_dir), flush_secs=int(FLUSH_S))

    def on_iteration(self, record: dict[str, Any]) -> None:
        step = int(record["iteration"])
        if step not in self._iterations:
            self._iterations.add(step)
            self._write(iteration_scalars(record), step)

    def on_epoch(self, record: dict[str, Any]) -> None:
        step = int(record["iteration"])
        if step not in self._epochs:
            self._epochs.add(step)
            self._write(epoch_scalars(record), step)
            self._writer.flush()

    def on_end(self, result: TrainResult | None) -> None:
        try:
            if result is not None:  # fill in what an earlier part lost, if anything
                for row in result.history:
                    self.on_iteration(row)
                for entry in result.epoch_metrics:
                    self.on_epoch(entry)
        finally:
            self._writer.close()

    def _write(self, scalars: dict[str, float], step: int) -> None:
        for tag, value in scalars.items():
            self._writer.add_scalar(tag, value, step)


def written_steps(log_dir: Path) -> tuple[set[int], set[int]]:
    """The iterations and the epochs (by their last iteration) whose scalars the event files in
    ``log_dir`` hold, read with TensorBoard's own reader. A file cut short by a killed writer
    yields its complete records."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    iterations: set[int] = set()
    epochs: set[int] = set()
    for path in sorted(log_dir.glob("events.out.tfevents.*")):
        try:
            events = list(EventFileLoader(str(path)).Load())
        except OSError:  # unreadable: its steps are written again rather than lost
            continue
        for event in events:
            for value in event.summary.value:
                if value.tag == _ITERATION_TAG:
                    iterations.add(int(event.step))
                elif value.tag == _EPOCH_TAG:
                    epochs.add(int(event.step))
    return iterations, epochs
