"""Callbacks: a run's records handed to your code while it trains.

``smlt.train(..., callbacks=[...])`` and ``smlt.resume(..., callbacks=[...])`` take instances of
:class:`Callback` subclasses, which override what they need of three methods:

- ``on_iteration(record)``: once per iteration this call of the driver runs, in order. The
  record is the iteration's entry as ``result.json``'s ``history`` will hold it (``iteration``,
  ``epoch``, ``loss``, ``lr``, ``grad_norm`` (before clipping), ``samples_per_s``, the phase
  times ``data_s``, ``compute_s``, ``sync_s``, ..., ``part``, ``wall_s`` since the run started),
  plus ``cost_usd``: the whole run's cost so far, as of when the driver saw the iteration.
- ``on_epoch(record)``: once per epoch that ends in this call, in order, once its ``evaluate()``
  metrics are in: the epoch's entry as ``result.json``'s ``epoch_metrics`` will hold it
  (``epoch``, ``iteration`` (its last), ``train_loss``, ``lr`` (its last step's),
  ``samples_per_s``, ``part``, and your metrics by the names ``evaluate()`` gave them).
- ``on_end(result)``: once, when the call ends: the :class:`~smlt.client.driver.TrainResult` if
  the run finished, None if it failed or was stopped (``train()`` then raises as usual). Every
  callback gets it, whatever another one did, so each can close what it opened.

Each callback gets its own copy of a record. A resumed run goes on from its newest checkpoint:
its callbacks get the iterations from there on, each once, even though the checkpoint carries the
history before it and the driver sees overlapping views of the history (it polls twice a second,
and after a lost Redis the scheduler redoes the iterations since the checkpoint).

**Which thread.** Callbacks run on the driver's polling thread (the thread that called
``train()``), one after another, between two polls of the scheduler. The workers and the
scheduler do not wait for them: the scheduler runs in a Ray actor of its own (on a thread of its
own with ``SMLT_SCHEDULER_IN_PROCESS=1``) and follows the workers without the driver. A slow
callback therefore delays only what the driver does: the live display, ``status.json``, the
records still to come, and the return of ``train()`` (tests/test_logging.py blocks a callback
until the run's final checkpoint is committed, and the run finishes meanwhile). With the
scheduler on a thread of the driver's process, a callback that computes for long without
releasing the GIL competes with it for the interpreter: keep heavy work off that thread.

**A callback that raises stops the run**, as Ctrl-C does: the workers are stopped,
``status.json`` says failed, the newest checkpoint stays (``smlt resume`` continues from it), and
``train()`` raises :class:`~smlt.errors.CallbackError` naming the callback, the method and the
iteration, with the callback's exception as its ``__cause__``. Logging it and going on instead
would leave a run whose logs or early-stopping decisions silently stopped part-way, noticed only
after it was paid for; a stopped run loses at most the iterations since its last checkpoint.
``KeyboardInterrupt`` raised in a callback stays what it is.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from smlt.errors import CallbackError, ConfigError

if TYPE_CHECKING:
    from smlt.client.driver import TrainResult

__all__ = ["Callback", "RecordFeed", "check_callbacks"]


class Callback:
    """Receives a run's records as they happen; override the methods you need (each does
    nothing here). The module docstring says what each record holds and on which thread the
    methods run."""

    def on_iteration(self, record: dict[str, Any]) -> None:
        """One iteration's entry of the history, with the run's ``cost_usd`` so far."""

    def on_epoch(self, record: dict[str, Any]) -> None:
        """One epoch's entry, with the metrics ``evaluate()`` returned for it."""

    def on_end(self, result: TrainResult | None) -> None:
        """The call ended: its result, or None if it failed or was stopped."""


def check_callbacks(callbacks: Iterable[Callback]) -> tuple[Callback, ...]:
    """``callbacks`` as a tuple, each checked to be a :class:`Callback` before anything starts
    (a function passed by mistake would otherwise fail at the first iteration, paid for)."""
    if isinstance(callbacks, Callback):
        raise ConfigError("callbacks takes a list of smlt.Callback instances, got one callback")
    checked = tuple(callbacks)
    for callback in checked:
        if not isinstance(callback, Callback):
            raise ConfigError(
                f"callbacks takes instances of smlt.Callback subclasses; got {callback!r} "
                f"({type(callback).__name__}): subclass smlt.Callback and override on_iteration, "
                "on_epoch or on_end"
            )
    return checked


class RecordFeed:
    """Hands the records that one call of the driver sees to its callbacks, each once, in order.

    The driver calls :meth:`deliver` after every poll of the scheduler with the history rows from
    :attr:`next_iteration` on (rows it has seen already come again: the scheduler cannot know
    what the driver got) and the run's epochs so far; :meth:`finish` with the result, or
    :meth:`fail`. Iterations go out strictly in order: a row that arrives before the one it
    follows waits for it. Epochs go out once the iterations up to their end have, also in order;
    whatever waits is delivered by :meth:`finish`, from the complete record.
    """

    def __init__(
        self,
        callbacks: Sequence[Callback],
        *,
        first_iteration: int,
        iterations_per_epoch: int,
        run_dir: str,
    ) -> None:
        self.callbacks = tuple(callbacks)
        #: The next iteration to deliver; this call of the driver starts at ``first_iteration``.
        self.next_iteration = first_iteration
        self._per_epoch = max(1, iterations_per_epoch)
        self._epochs_from = first_iteration  # epochs ending before it are delivered or not ours
        self._run_dir = run_dir
        self._finished = False  # the run's results are written: a callback can stop nothing

    def deliver(
        self, history: Iterable[dict[str, Any]], epochs: Iterable[dict[str, Any]], cost_usd: float
    ) -> None:
        """The records one poll brought: ``history`` rows (any order, repeats allowed) and the
        run's ``epochs`` so far; ``cost_usd`` is the run's cost as of this poll."""
        rows = {int(row["iteration"]): row for row in history}
        while self.next_iteration in rows:
            self._iteration({**rows[self.next_iteration], "cost_usd": cost_usd})
        pending = self._pending_epochs(epochs)
        for end in sorted(pending):
            # The next epoch to end, and its iterations delivered: a later one waits.
            if end != self._next_epoch_end() or end >= self.next_iteration:
                break
            self._epoch(pending[end])

    def finish(self, result: TrainResult) -> None:
        """The run finished: deliver what has not been (from its complete record), then
        ``on_end(result)`` to every callback, even if one of them raised meanwhile."""
        self._finished = True
        raised: list[CallbackError] = []
        try:
            for row in sorted(result.history, key=lambda r: int(r["iteration"])):
                if int(row["iteration"]) >= self.next_iteration:
                    self.next_iteration = int(row["iteration"])
                    self._iteration({**row, "cost_usd": result.cost_usd})
            pending = self._pending_epochs(result.epoch_metrics)
            for end in sorted(pending):
                self._epoch(pending[end])
        except CallbackError as exc:
            raised.append(exc)
        for callback in self.callbacks:
            try:
                callback.on_end(result)
            except Exception as exc:
                error = self._error(callback, "on_end", exc, "at the end")
                error.__cause__ = exc
                raised.append(error)
        if raised:
            for other in raised[1:]:
                raised[0].add_note(str(other))
            raise raised[0]

    def fail(self, error: BaseException) -> None:
        """The run failed or was stopped with ``error``: ``on_end(None)`` to every callback. What
        one of them raises is added to ``error``'s notes, not raised: the run's error is the
        one to report."""
        for callback in self.callbacks:
            try:
                callback.on_end(None)
            except Exception as exc:
                error.add_note(
                    f"callback {_name(callback)}.on_end raised {type(exc).__name__}: {exc}"
                )

    # -- delivery ------------------------------------------------------------------------------

    def _iteration(self, record: dict[str, Any]) -> None:
        iteration = int(record["iteration"])
        self.next_iteration = iteration + 1  # first: a callback that raises stops the run
        self._call("on_iteration", record, f"at iteration {iteration}")

    def _epoch(self, record: dict[str, Any]) -> None:
        self._epochs_from = int(record["iteration"]) + 1
        self._call("on_epoch", record, f"at epoch {record.get('epoch')}")

    def _pending_epochs(self, epochs: Iterable[dict[str, Any]]) -> dict[int, dict[str, Any]]:
        """The epochs not delivered yet, by their last iteration."""
        return {int(e["iteration"]): e for e in epochs if int(e["iteration"]) >= self._epochs_from}

    def _next_epoch_end(self) -> int:
        """The last iteration of the next epoch to deliver."""
        per = self._per_epoch
        return (self._epochs_from // per) * per + per - 1

    def _call(self, method: str, record: dict[str, Any], where: str) -> None:
        for callback in self.callbacks:
            try:
                getattr(callback, method)(dict(record))
            except Exception as exc:
                raise self._error(callback, method, exc, where) from exc

    def _error(self, callback: Callback, method: str, exc: Exception, where: str) -> CallbackError:
        """The error that names ``callback``, and what became of the run."""
        if self._finished:
            consequence = f"the run had finished; its results are in {self._run_dir}"
        else:
            consequence = (
                f"the run was stopped; smlt resume {self._run_dir} continues it from its newest "
                "checkpoint, if one was committed"
            )
        return CallbackError(
            f"callback {_name(callback)}.{method} raised {type(exc).__name__}: {exc} ({where}); "
            f"{consequence}",
            callback=callback,
        )


def _name(callback: Callback) -> str:
    return type(callback).__qualname__
