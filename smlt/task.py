"""The user's contract: a :class:`Task` says what to train, and smlt decides where and how.

A task is a plain class in a plain ``.py`` file, named on the command line as
``path/to/file.py:ClassName``. The same file is shipped to every worker through the object store
and imported there with :func:`load_task`, so a task must be importable on its own: anything it
needs beside torch, numpy and the installed packages must live in that one file.

Everything the user writes is checked here, once, on the client, before a single worker is paid
for: :func:`check_task` validates ``data()`` (a training set in memory becomes a
:class:`TaskData`; one that arrives in chunks, a :class:`StreamData` whose every chunk is checked
as the artifact manager draws it), and :func:`check_model`, :func:`check_optimizer`,
:func:`check_scheduler` and :func:`check_loss` validate the other methods on a tiny batch
(:func:`clip_grad_norm`, :func:`loss_reduction` and :func:`scheduler_interval` the class
attributes). Each failure is a
:class:`~smlt.errors.TaskError` whose message names the file, the method and what was expected,
because the person reading it did not write smlt and should not have to read it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import math
import numbers
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, TensorDataset, default_collate

from smlt.errors import TaskError

if TYPE_CHECKING:
    from smlt.sample_random import SampleRandom

__all__ = [
    "HEAD_SAMPLES",
    "ITERABLE_CHUNK_BYTES",
    "StreamData",
    "Task",
    "TaskData",
    "check_loss",
    "check_loss_reduction",
    "check_model",
    "check_optimizer",
    "check_scheduler",
    "check_task",
    "check_transform",
    "clip_grad_norm",
    "load_task",
    "loss_reduction",
    "overrides_evaluate",
    "overrides_transform",
    "run_evaluate",
    "run_transform",
    "scheduler_interval",
    "transformed_head",
]

#: Methods a Task subclass must override; ``evaluate`` is optional.
REQUIRED_METHODS = ("data", "model", "optimizer", "loss")

Batch = tuple[torch.Tensor, ...]

#: Samples of a streamed training set kept in memory for the client's checks (loss, update,
#: memory measure, calibration): enough for each of them (calibration times up to 64 rows), few
#: enough that the head of any data set is small. A stream's first chunks are read until the
#: head is this long (or the stream ends).
HEAD_SAMPLES = 64
#: An ``IterableDataset``'s samples are collated into chunks of about this many bytes (a fixed
#: number of samples per data set, from the size of its first sample; 1 to 4096 samples):
#: large enough that collating is not per-sample overhead, small beside a shard.
ITERABLE_CHUNK_BYTES = 4 * 2**20
_MAX_ITERABLE_CHUNK_SAMPLES = 4096


class Task:
    """Subclass this and override ``data``, ``model``, ``optimizer`` and ``loss``.

    The methods are called in separate processes, possibly on different machines: the client
    calls ``data()`` once to package the samples, and every worker calls ``model()``,
    ``optimizer(model)`` and ``loss(model, batch)`` itself. Keep them deterministic (seed any
    randomness), because data-parallel training needs every worker to start from the same model.
    ``__init__`` must take no arguments.
    """

    #: How ``loss()`` reduces over the samples of its batch: ``"mean"`` (PyTorch's default, e.g.
    #: ``cross_entropy(model(x), y)``) or ``"sum"`` (``reduction="sum"``). smlt scales each
    #: worker's gradient so that the global batch gets exactly the gradient one worker with the
    #: whole batch would: by the worker's share ``b_r / B`` for a mean, not at all for a sum.
    #: The declaration is checked on your machine before anything starts.
    loss_reduction: ClassVar[str] = "mean"

    #: Clip the gradient by its global norm before every optimizer step, as
    #: ``torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)`` would between
    #: ``loss.backward()`` and ``optimizer.step()``: the norm is the L2 norm over every parameter
    #: that has a gradient, of the gradient of the whole global batch, and the gradient is scaled
    #: by ``clip_grad_norm / (norm + 1e-6)`` when that is below 1. None (the default): no
    #: clipping. The norm is reported per iteration either way (``grad_norm`` in the history).
    clip_grad_norm: ClassVar[float | None] = None

    #: How often the schedule of :meth:`scheduler` steps: ``"iteration"`` (after every
    #: optimizer step, the default) or ``"epoch"`` (after the last iteration of every epoch).
    scheduler_interval: ClassVar[str] = "iteration"

    def data(
        self,
    ) -> (
        Sequence[torch.Tensor | np.ndarray]
        | Dataset[Any]
        | Iterator[Sequence[torch.Tensor | np.ndarray]]
    ):
        """The training set, in one of four forms; the client calls it once per run.

        In memory (the whole set is loaded on the client):

        - a tuple of tensors or numpy arrays with equal first dimension (one row per sample),
          e.g. ``return x, y``;
        - a map-style torch ``Dataset`` (``__len__`` and ``__getitem__``) whose items
          ``default_collate`` into such a tuple.

        Streamed, for a set larger than the client's memory (it never is held whole):

        - an **iterator or generator of chunks**: each chunk a tuple of tensors or numpy arrays
          with equal first dimension, e.g. one chunk per ``.npy`` file read from disk or S3.
          Every chunk must have the dtypes and per-sample shapes of the first; a chunk may hold
          any number of rows (none included), and the stream at least one sample in all;
        - a ``torch.utils.data.IterableDataset`` yielding samples (a tensor or a tuple of
          tensors each); smlt collates them into chunks of a fixed number of samples with
          ``default_collate``.

        smlt packages a stream into shards as the chunks come, holding about one shard and one
        chunk in memory; the checks that run on the client (the loss, an update, the memory
        measure, the calibration of a goal) use the first :data:`HEAD_SAMPLES` samples only.
        Every chunk is checked as it is drawn, so a bad one fails the packaging with a
        :class:`~smlt.errors.TaskError` naming its number. Samples are numbered in the order
        given and stored as shards of consecutive samples; the sampler, not this order, decides
        what each iteration trains on.
        """
        raise NotImplementedError

    def model(self) -> torch.nn.Module:
        """A freshly initialized model; must be identical on every call (seed it)."""
        raise NotImplementedError

    def optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        """The optimizer over ``model.parameters()``."""
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """The scalar loss of ``model`` on ``batch``, a tuple of tensors shaped like ``data()``."""
        raise NotImplementedError

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Optional metrics reported per epoch, e.g. held-out accuracy. Default: none."""
        return {}

    def scheduler(
        self, optimizer: torch.optim.Optimizer
    ) -> torch.optim.lr_scheduler.LRScheduler | None:
        """Optional learning-rate schedule over ``optimizer`` (the one ``optimizer(model)``
        returned), e.g. ``OneCycleLR(optimizer, max_lr=0.1, total_steps=...)``. It is stepped as
        in ``optimizer.step(); scheduler.step()``, once per iteration (or per epoch, see
        :attr:`scheduler_interval`), and every hyperparameter it sets (the learning rate, and
        the momentum or betas that OneCycleLR cycles) applies to every worker's update.

        Workers are stateless: one that starts at iteration t builds the schedule afresh and
        steps it t times, so build it from the optimizer and constants only (no state from
        elsewhere, no randomness). Default: no schedule.
        """
        return None

    def transform(self, batch: Batch, epoch: int, rng: SampleRandom) -> Batch:
        """Optional augmentation, run on the worker on the samples it read, before ``loss()``.

        ``batch`` is a tuple of tensors shaped like ``data()`` (any number of samples), ``epoch``
        the epoch being trained, and ``rng`` a :class:`smlt.SampleRandom`: random draws per
        sample, keyed by (seed, epoch, global sample index). Draw every random number from
        ``rng`` and treat each sample on its own (no statistics across the batch): then a sample
        is augmented the same way whichever worker reads it, and again when a failed iteration
        runs twice, but differently every epoch. Both rules are checked on the client. Return
        the transformed tuple (shapes may change, e.g. a crop). Default: no transform.
        """
        return batch


@dataclass(frozen=True)
class TaskData:
    """The validated training set: CPU, contiguous tensors sharing their first dimension."""

    tensors: tuple[torch.Tensor, ...]
    num_samples: int

    @property
    def dtypes(self) -> tuple[torch.dtype, ...]:
        return tuple(t.dtype for t in self.tensors)

    @property
    def sample_shapes(self) -> tuple[tuple[int, ...], ...]:
        """The shape of one sample of each tensor (the shape without the first dimension)."""
        return tuple(tuple(t.shape[1:]) for t in self.tensors)

    @property
    def bytes_per_sample(self) -> int:
        """Bytes one sample occupies across all tensors; what sharding divides by."""
        return sum(math.prod(t.shape[1:]) * t.element_size() for t in self.tensors)

    def rows(self, start: int, stop: int) -> Batch:
        """Samples ``[start, stop)`` of every tensor, as views."""
        return tuple(t[start:stop] for t in self.tensors)

    @property
    def head(self) -> TaskData:
        """The samples the client's checks run on: all of them, for a set in memory (a
        :class:`StreamData` has only its first few)."""
        return self


@dataclass(frozen=True)
class StreamData:
    """A validated training set that arrives in chunks and is read once, by the packager.

    ``data()`` returned an iterator of chunks or an ``IterableDataset`` (see
    :meth:`Task.data`): the set may be larger than the client's memory, so it is never held
    whole. What the client needs before packaging comes from ``head``, and the number of
    samples is known only once ``chunks`` is exhausted (the manifest says it).
    """

    #: The stream's first :data:`HEAD_SAMPLES` samples (all of them, if it has fewer), copied
    #: out of their chunks: what every client-side check, the memory measure and the
    #: calibration run on. Its dtypes and sample shapes are every chunk's.
    head: TaskData
    #: Every chunk from the first (those read to build ``head`` are replayed first), each
    #: checked against the first as it is drawn; one-shot, like the user's generator.
    chunks: Iterator[TaskData]
    #: ``len()`` of an ``IterableDataset`` that defines it (samples, as the user declares them);
    #: None for an iterator of chunks, whose size only reading it tells.
    declared_samples: int | None = None

    @property
    def dtypes(self) -> tuple[torch.dtype, ...]:
        return self.head.dtypes

    @property
    def sample_shapes(self) -> tuple[tuple[int, ...], ...]:
        return self.head.sample_shapes

    @property
    def bytes_per_sample(self) -> int:
        return self.head.bytes_per_sample


def load_task(spec: str) -> Task:
    """Import ``path/to/file.py:ClassName`` and return an instance of the class.

    The file is imported under a module name derived from its absolute path, so two task files
    both called ``task.py`` do not collide, and the module is registered in ``sys.modules`` (so
    dataclasses and pickling inside it work). The file's folder is on ``sys.path`` only while the
    file executes: imports of sibling modules at the top of the file work, but nothing leaks into
    the rest of the process.
    """
    path_text, sep, class_name = spec.rpartition(":")
    if not sep or not path_text or not class_name:
        raise TaskError(
            f"task spec {spec!r} must be 'path/to/file.py:ClassName' — a Python file and the "
            "name of the Task subclass in it, separated by a colon."
        )
    path = Path(path_text).expanduser().resolve()
    if not path.is_file():
        raise TaskError(
            f"task file {path_text!r} (from spec {spec!r}) does not exist or is not a file; "
            f"looked at {path}."
        )
    module = _import_file(path)
    cls = getattr(module, class_name, None)
    if cls is None:
        found = sorted(
            name
            for name, value in vars(module).items()
            if inspect.isclass(value) and issubclass(value, Task) and value is not Task
        )
        hint = (
            f"Task subclasses in the file: {', '.join(found)}."
            if found
            else ("The file defines no Task subclass.")
        )
        raise TaskError(f"task file {path} has no class {class_name!r}. {hint}")
    if not (inspect.isclass(cls) and issubclass(cls, Task)):
        raise TaskError(
            f"{class_name} in task file {path} is not a subclass of smlt.Task (it is "
            f"{_describe(cls)}); declare it as 'class {class_name}(smlt.Task):'."
        )
    missing = [name for name in REQUIRED_METHODS if getattr(cls, name) is getattr(Task, name)]
    if missing:
        raise TaskError(
            f"{class_name} in task file {path} does not define "
            f"{', '.join(m + '()' for m in missing)}; a Task must override "
            f"{', '.join(m + '()' for m in REQUIRED_METHODS)} (evaluate() is optional)."
        )
    try:
        return cls()
    except Exception as exc:
        raise TaskError(
            f"{class_name}() in task file {path} raised {type(exc).__name__}: {exc}. A Task is "
            f"constructed without arguments on every worker; do heavy work in data() instead."
            f"{_user_line(exc, path)}"
        ) from exc


def check_task(task: Task) -> TaskData | StreamData:
    """Call ``task.data()`` once and validate what it returned.

    Arrays become tensors, a ``Dataset`` is materialized (item by item, then ``default_collate``),
    and every tensor is detached, moved to the CPU and made contiguous, so the artifact manager
    can cut raw rows out of it. An iterator of chunks or an ``IterableDataset`` becomes a
    :class:`StreamData`: only its head is read here (and checked); the rest is checked chunk by
    chunk as the artifact manager draws it.
    """
    where = _where(task, "data")
    path = _task_file(task)
    try:
        raw = task.data()
    except Exception as exc:
        raise TaskError(
            f"{where} raised {type(exc).__name__}: {exc}.{_user_line(exc, path)}"
        ) from exc
    if isinstance(raw, IterableDataset):
        return _stream(*_collated_chunks(raw, where, path), where)
    if isinstance(raw, Iterator):
        return _stream(_chunks_of(raw, where, path), None, where)
    if isinstance(raw, TensorDataset):
        raw = raw.tensors
    elif isinstance(raw, Dataset):
        raw = _materialize(raw, where)
    if isinstance(raw, torch.Tensor | np.ndarray) or not isinstance(raw, tuple | list):
        raise TaskError(
            f"{where} returned {_describe(raw)}; expected a tuple of tensors or numpy arrays "
            "with equal first dimension (e.g. 'return x, y' or 'return (x,)'), a torch "
            "Dataset, or an iterator (generator) of such tuples, one chunk of rows each."
        )
    data = _chunk(raw, where, returned=True)
    if data.num_samples == 0:
        raise TaskError(
            f"{where} returned no samples (first dimension 0); there is nothing to train on."
        )
    return data


def check_model(task: Task) -> torch.nn.Module:
    """Call ``task.model()`` and check it returned an ``nn.Module`` with parameters."""
    where = _where(task, "model")
    model = _call(task, "model", where)
    if not isinstance(model, torch.nn.Module):
        raise TaskError(f"{where} returned {_describe(model)}; expected a torch.nn.Module.")
    if not any(p.requires_grad for p in model.parameters()):
        raise TaskError(
            f"{where} returned a model without trainable parameters; there is nothing to train."
        )
    return model


def check_optimizer(task: Task, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Call ``task.optimizer(model)`` and check it returned a ``torch.optim.Optimizer``."""
    where = _where(task, "optimizer")
    optimizer = _call(task, "optimizer", where, model)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TaskError(
            f"{where} returned {_describe(optimizer)}; expected a torch.optim.Optimizer over "
            "model.parameters(), e.g. torch.optim.SGD(model.parameters(), lr=0.1)."
        )
    return optimizer


def check_scheduler(
    task: Task, optimizer: torch.optim.Optimizer
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """Call ``task.scheduler(optimizer)`` and check it returned None or a learning-rate
    scheduler of ``optimizer`` that steps without arguments."""
    where = _where(task, "scheduler")
    scheduler = _call(task, "scheduler", where, optimizer)
    if scheduler is None:
        return None
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        raise TaskError(
            f"{where} returned a ReduceLROnPlateau, which steps on a metric smlt does not "
            "have at every iteration; use a schedule of the iteration count (OneCycleLR, "
            "LambdaLR, SequentialLR of LinearLR and CosineAnnealingLR, ...)."
        )
    if not isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler):
        raise TaskError(
            f"{where} returned {_describe(scheduler)}; expected None or a "
            "torch.optim.lr_scheduler scheduler of the optimizer it was given, e.g. "
            "torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=1000)."
        )
    if getattr(scheduler, "optimizer", None) is not optimizer:
        raise TaskError(
            f"{where} returned a {type(scheduler).__name__} of another optimizer; build it "
            "over the optimizer scheduler() is given (smlt passes each worker's own)."
        )
    return scheduler


def check_loss(task: Task, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Run ``task.loss(model, batch)`` once and check it is a differentiable scalar tensor.

    Call it with a tiny batch (a couple of rows of ``check_task(task).tensors``): it runs the
    user's forward pass, so this is where shape mistakes in the model show up, on the client.
    """
    where = _where(task, "loss")
    loss = _call(task, "loss", where, model, batch)
    if not isinstance(loss, torch.Tensor):
        raise TaskError(
            f"{where} returned {_describe(loss)}; expected a scalar torch.Tensor "
            "(e.g. torch.nn.functional.cross_entropy(model(x), y))."
        )
    if loss.dim() != 0:
        raise TaskError(
            f"{where} returned a tensor of shape {tuple(loss.shape)}; expected a scalar (shape "
            "()). Reduce it, e.g. with .mean()."
        )
    if not loss.is_floating_point():
        raise TaskError(
            f"{where} returned a {loss.dtype} tensor; expected a floating-point scalar."
        )
    if not loss.requires_grad:
        raise TaskError(
            f"{where} returned a scalar that does not depend on the model's parameters "
            "(requires_grad is False); compute it from model(...) and do not detach it."
        )
    return loss


def loss_reduction(task: Task) -> Literal["mean", "sum"]:
    """The task's declared ``loss_reduction``, checked."""
    value = _declared_choice(
        task,
        "loss_reduction",
        {"mean": "loss() averages over its batch", "sum": "loss() sums over its batch"},
    )
    return "sum" if value == "sum" else "mean"


def clip_grad_norm(task: Task) -> float | None:
    """The task's declared ``clip_grad_norm``, checked: None, or a positive finite number."""
    value = getattr(task, "clip_grad_norm", None)
    if value is None:
        return None
    number = float(value) if isinstance(value, numbers.Real) else math.nan
    if isinstance(value, bool) or not (math.isfinite(number) and number > 0):
        raise TaskError(
            f"{type(task).__name__}.clip_grad_norm is {value!r}; it must be None (no clipping) "
            "or a positive number, the largest global gradient norm to let through (e.g. 1.0)"
        )
    return number


def scheduler_interval(task: Task) -> Literal["iteration", "epoch"]:
    """The task's declared ``scheduler_interval``, checked."""
    value = _declared_choice(
        task,
        "scheduler_interval",
        {
            "iteration": "the schedule steps after every optimizer step",
            "epoch": "after every epoch's last one",
        },
    )
    return "epoch" if value == "epoch" else "iteration"


def _declared_choice(task: Task, name: str, meanings: dict[str, str]) -> str:
    """``task.<name>`` (the first choice if absent), which must be one of ``meanings``."""
    value = getattr(task, name, next(iter(meanings)))
    if isinstance(value, str) and value in meanings:
        return value
    choices = " or ".join(f"{choice!r} ({meaning})" for choice, meaning in meanings.items())
    raise TaskError(f"{type(task).__name__}.{name} is {value!r}; it must be {choices}")


def overrides_evaluate(task: Task) -> bool:
    """True if the task defines ``evaluate`` (the base class's reports nothing)."""
    return type(task).evaluate is not Task.evaluate


def check_loss_reduction(task: Task, model: torch.nn.Module, data: TaskData) -> None:
    """Check that ``loss()`` reduces its batch the way ``loss_reduction`` declares.

    Data parallelism splits a batch, so it must know how the loss combines samples: a summed
    loss treated as a mean would silently get 1/n of its gradient. The loss of k samples is
    compared with the sum and the mean of their k single-sample losses (model in eval mode, so
    dropout and batch statistics do not blur the comparison). A loss that matches neither, or
    cannot run on one sample, is not judged.
    """
    declared = loss_reduction(task)
    k = min(4, data.num_samples)
    if k < 2:
        return
    where = _where(task, "loss")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            whole = float(task.loss(model, data.rows(0, k)))
            singles = [float(task.loss(model, data.rows(i, i + 1))) for i in range(k)]
    except Exception:
        return  # e.g. a loss that needs two samples: the split cannot be judged this way
    finally:
        model.train(was_training)
    total = sum(singles)
    mean = total / k

    def close(a: float, b: float) -> bool:
        return abs(a - b) <= 1e-4 * max(abs(a), abs(b), 1e-12)

    looks = "sum" if close(whole, total) and not close(whole, mean) else None
    if close(whole, mean) and not close(whole, total):
        looks = "mean"
    if looks is not None and looks != declared:
        raise TaskError(
            f"{where} {'sums' if looks == 'sum' else 'averages'} over its batch (the loss of "
            f"{k} samples is {whole:.6g}; their single-sample losses add up to {total:.6g}, "
            f"average {mean:.6g}), but {type(task).__name__}.loss_reduction is {declared!r}. "
            f"Set loss_reduction = {looks!r} in the class (or change the reduction), so that "
            "smlt scales each worker's gradient correctly."
        )


def run_evaluate(task: Task, model: torch.nn.Module) -> dict[str, float]:
    """Call ``task.evaluate(model)`` and return its metrics as ``{str: float}``."""
    where = _where(task, "evaluate")
    metrics = _call(task, "evaluate", where, model)
    if not isinstance(metrics, dict):
        raise TaskError(
            f"{where} returned {_describe(metrics)}; expected a dict of metric "
            "name to number, e.g. {'accuracy': 0.93}."
        )
    out: dict[str, float] = {}
    for name, value in metrics.items():
        try:
            number = float(value)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TaskError(
                f"{where} returned metric {name!r} = {_describe(value)}; expected a number."
            ) from exc
        out[str(name)] = number
    return out


# --- helpers ---------------------------------------------------------------------------------


def _import_file(path: Path) -> ModuleType:
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:12]
    module_name = f"smlt_task_{_identifier(path.stem)}_{digest}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise TaskError(
            f"task file {path} cannot be imported as a Python module; it must be a .py file."
        )
    module = importlib.util.module_from_spec(spec)
    folder = str(path.parent)
    sys.modules[module_name] = module
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        sys.modules.pop(module_name, None)
        raise TaskError(
            f"task file {path} has a syntax error at line {exc.lineno}: {exc.msg}. Fix the file "
            "and run again."
        ) from exc
    except ImportError as exc:
        sys.modules.pop(module_name, None)
        raise TaskError(
            f"task file {path} failed to import: {type(exc).__name__}: {exc}"
            f"{_user_line(exc, path)}. Install the missing package where smlt runs (workers "
            "too), or move the code into the task file."
        ) from exc
    except Exception as exc:
        sys.modules.pop(module_name, None)
        raise TaskError(
            f"task file {path} raised {type(exc).__name__} while being imported: {exc}"
            f"{_user_line(exc, path)}."
        ) from exc
    finally:
        try:
            sys.path.remove(folder)
        except ValueError:  # the file itself removed it; nothing to undo
            pass
    return module


def _identifier(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text)


def _materialize(dataset: Dataset[Any], where: str) -> Any:
    """Turn a map-style Dataset into collated tensors, because shards hold raw rows."""
    try:
        n = len(dataset)  # type: ignore[arg-type]
    except TypeError as exc:
        raise TaskError(
            f"{where} returned a Dataset without __len__; smlt needs a map-style "
            "Dataset of known length (or return tensors directly)."
        ) from exc
    if n == 0:
        raise TaskError(f"{where} returned an empty Dataset; there is nothing to train on.")
    return _collate_items([dataset[i] for i in range(n)], where, 0, returned=True)


def _stream(chunks: Iterator[TaskData], declared_samples: int | None, where: str) -> StreamData:
    """Read a stream's first chunks until :data:`HEAD_SAMPLES` samples are in hand, copy the
    head out of them (so that it does not keep a large first chunk alive), and hand the chunks
    back to be replayed before the rest."""
    pulled: list[TaskData] = []
    count = 0
    for chunk in chunks:
        pulled.append(chunk)
        count += chunk.num_samples
        if count >= HEAD_SAMPLES:
            break
    if count == 0:
        got = f"{len(pulled)} chunks, all of them empty" if pulled else "no chunk at all"
        raise TaskError(f"{where} yielded no samples ({got}); there is nothing to train on.")
    parts: list[Batch] = []
    wanted = HEAD_SAMPLES
    for chunk in pulled:
        take = min(wanted, chunk.num_samples)
        if take:
            parts.append(chunk.rows(0, take))
        wanted -= take
    # torch.cat always allocates: the head shares no storage with the chunks.
    head = tuple(torch.cat([part[i] for part in parts]) for i in range(len(parts[0])))
    return StreamData(
        head=TaskData(tensors=head, num_samples=min(count, HEAD_SAMPLES)),
        chunks=_replay(pulled, chunks),
        declared_samples=declared_samples,
    )


def _replay(pulled: list[TaskData], rest: Iterator[TaskData]) -> Iterator[TaskData]:
    """``pulled``, then ``rest``; each of ``pulled`` is let go of as it is handed out."""
    while pulled:
        yield pulled.pop(0)
    yield from rest


def _chunks_of(
    raw: Iterator[Any],
    where: str,
    path: Path | None,
    name: Callable[[int], str] | None = None,
) -> Iterator[TaskData]:
    """Each chunk ``raw`` yields, as :class:`TaskData`, checked as it is drawn: a tuple of
    tensors of equal length, with the dtypes and sample shapes of the first chunk.

    Only the first chunk's layout is remembered, never a chunk: the caller decides how long
    one lives. ``name(number)`` says which chunk a message is about.
    """
    name = name or (lambda number: f"chunk {number} (counting from 0) of {where}")
    layout: tuple[tuple[torch.dtype, tuple[int, ...]], ...] | None = None
    number = 0
    while True:
        try:
            item = next(raw)
        except StopIteration:
            return
        except TaskError:
            raise
        except Exception as exc:
            raise TaskError(
                f"{where} raised {type(exc).__name__} while producing {name(number)}: "
                f"{exc}.{_user_line(exc, path)}"
            ) from exc
        chunk = _chunk(item, name(number))
        del item
        shapes = tuple(zip(chunk.dtypes, chunk.sample_shapes, strict=True))
        if layout is None:
            layout = shapes
        else:
            _check_layout(shapes, layout, name(number))
        yield chunk
        del chunk  # not alive while the next one is read
        number += 1


def _chunk(item: object, name: str, *, returned: bool = False) -> TaskData:
    """One chunk of a stream (or, ``returned``, what ``data()`` returned) as tensors of equal
    length; no rows at all is allowed here."""
    is_, holds = ("returned", "returned") if returned else ("is", "holds")
    if isinstance(item, torch.Tensor | np.ndarray) or not isinstance(item, tuple | list):
        raise TaskError(
            f"{name} {is_} {_describe(item)}; expected a tuple of tensors or numpy arrays with "
            "equal first dimension (e.g. 'yield x, y' or 'yield (x,)')."
        )
    if not item:
        raise TaskError(f"{name} {is_} an empty tuple; expected at least one tensor.")
    tensors = tuple(_as_tensor(t, i, name) for i, t in enumerate(item))
    lengths = [t.shape[0] for t in tensors]
    if len(set(lengths)) != 1:
        raise TaskError(
            f"{name} {holds} tensors of unequal length {lengths} along the first dimension; "
            "every tensor must hold one row per sample."
        )
    return TaskData(tensors=tensors, num_samples=lengths[0])


def _check_layout(
    shapes: tuple[tuple[torch.dtype, tuple[int, ...]], ...],
    first: tuple[tuple[torch.dtype, tuple[int, ...]], ...],
    name: str,
) -> None:
    """A chunk must have the first chunk's tensors: shards are cut by one layout."""
    rule = "every chunk must have the dtypes and per-sample shapes of the first"
    if len(shapes) != len(first):
        raise TaskError(
            f"{name} has {len(shapes)} tensors, but the first chunk had {len(first)}; {rule}."
        )
    for i, ((dtype, shape), (dtype0, shape0)) in enumerate(zip(shapes, first, strict=True)):
        if dtype != dtype0:
            raise TaskError(
                f"{name}: tensor {i} is {str(dtype).removeprefix('torch.')}, but the first "
                f"chunk's was {str(dtype0).removeprefix('torch.')}; {rule} (convert it, e.g. "
                "x.astype(np.float32) or x.float())."
            )
        if shape != shape0:
            raise TaskError(
                f"{name}: tensor {i} has samples of shape {shape}, but the first chunk's had "
                f"{shape0}; {rule}."
            )


def _collated_chunks(
    dataset: IterableDataset[Any], where: str, path: Path | None
) -> tuple[Iterator[TaskData], int | None]:
    """An ``IterableDataset``'s samples, collated into checked chunks, and its declared
    ``len()`` (None if it has none)."""
    declared: int | None = None
    try:
        length = len(dataset)  # type: ignore[arg-type]
    except Exception:  # an IterableDataset need not have a length
        length = None
    if isinstance(length, int) and length >= 0:
        declared = length
    size = [1]  # samples per chunk, fixed by the first sample's size

    def name(number: int) -> str:
        first = number * size[0]
        return f"chunk {number} (samples {first} to {first + size[0] - 1}) of {where}"

    return _chunks_of(_collate_samples(dataset, where, path, size), where, path, name), declared


def _collate_samples(
    dataset: IterableDataset[Any], where: str, path: Path | None, size: list[int]
) -> Iterator[tuple[Any, ...]]:
    """The dataset's samples, ``size[0]`` at a time, through ``default_collate``; ``size[0]``
    is set from the first sample (about :data:`ITERABLE_CHUNK_BYTES` per chunk)."""
    what = f"{where} (an IterableDataset)"
    try:
        samples = iter(dataset)
    except Exception as exc:
        raise TaskError(
            f"iter() of {what} raised {type(exc).__name__}: {exc}.{_user_line(exc, path)}"
        ) from exc
    buffer: list[Any] = []
    count = 0
    while True:
        try:
            sample = next(samples)
        except StopIteration:
            break
        except Exception as exc:
            raise TaskError(
                f"{what} raised {type(exc).__name__} while producing sample {count}: "
                f"{exc}.{_user_line(exc, path)}"
            ) from exc
        if count == 0:
            one = _collate_items([sample], what, 0)
            sample_bytes = sum(t.numel() * t.element_size() for t in one if torch.is_tensor(t))
            size[0] = max(
                1, min(_MAX_ITERABLE_CHUNK_SAMPLES, ITERABLE_CHUNK_BYTES // max(1, sample_bytes))
            )
        buffer.append(sample)
        count += 1
        if len(buffer) == size[0]:
            yield _collate_items(buffer, what, count - len(buffer))
            buffer = []
    if buffer:
        yield _collate_items(buffer, what, count - len(buffer))


def _collate_items(
    items: list[Any], what: str, first: int, *, returned: bool = False
) -> tuple[Any, ...]:
    """``default_collate(items)`` as a tuple, or a TaskError naming the samples (a stream's
    span of them, or, ``returned``, the items of the Dataset ``data()`` returned)."""
    if returned:
        these, each = f"{what} returned a Dataset whose items", "each item"
    else:
        these, each = (
            f"{what} yielded samples {first} to {first + len(items) - 1}, which",
            ("each sample"),
        )
    try:
        collated = default_collate(items)
    except Exception as exc:
        raise TaskError(
            f"{these} could not be stacked ({type(exc).__name__}: {exc}); {each} must be a "
            "tensor or a tuple of tensors/numbers of one shape."
        ) from exc
    if isinstance(collated, torch.Tensor):
        return (collated,)
    if isinstance(collated, tuple | list):
        return tuple(collated)
    raise TaskError(
        f"{these} collate to {_describe(collated)}; expected {each} to be a tensor or a tuple "
        "of tensors."
    )


def _as_tensor(item: object, index: int, where: str) -> torch.Tensor:
    if isinstance(item, np.ndarray):
        if item.dtype == object or item.dtype.kind in "USV":
            raise TaskError(
                f"{where} returned element {index} as a numpy array of dtype "
                f"{item.dtype}; expected a numeric array."
            )
        item = torch.from_numpy(np.ascontiguousarray(item))
    if not isinstance(item, torch.Tensor):
        raise TaskError(
            f"{where} returned element {index} as {_describe(item)}; expected a "
            "torch.Tensor or numpy array."
        )
    if item.layout != torch.strided:
        raise TaskError(
            f"{where} returned element {index} with layout {item.layout}; expected "
            "a dense tensor (call .to_dense())."
        )
    if item.dim() == 0:
        raise TaskError(
            f"{where} returned element {index} as a 0-dimensional tensor; expected "
            "one row per sample along the first dimension."
        )
    return item.detach().cpu().contiguous()


def _call(task: Task, method: str, where: str, *args: Any) -> Any:
    try:
        return getattr(task, method)(*args)
    except TaskError:
        raise
    except Exception as exc:
        raise TaskError(
            f"{where} raised {type(exc).__name__}: {exc}.{_user_line(exc, _task_file(task))}"
        ) from exc


def _task_file(task: Task) -> Path | None:
    try:
        source = inspect.getsourcefile(type(task))
    except TypeError:
        return None
    return Path(source) if source else None


def _where(task: Task, method: str) -> str:
    """``Digits.data() in /path/digits.py``: how every message names the culprit."""
    path = _task_file(task)
    suffix = f" in task file {path}" if path else ""
    return f"{type(task).__name__}.{method}(){suffix}"


def _user_line(exc: BaseException, path: Path | None) -> str:
    """`` (line 12)`` of the deepest frame in the user's file, or nothing."""
    if path is None:
        return ""
    lines = [
        frame.lineno
        for frame in traceback.extract_tb(exc.__traceback__)
        if frame.filename and Path(frame.filename) == path
    ]
    return f" (at {path.name} line {lines[-1]})" if lines else ""


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, np.ndarray):
        return f"a numpy array of shape {value.shape}"
    if value is None:
        return "None"
    if inspect.isclass(value):
        return f"the class {value.__qualname__}"
    return f"a {type(value).__qualname__}"


def overrides_transform(task: Task) -> bool:
    """True if the task defines ``transform`` (the base class's returns the batch unchanged)."""
    return type(task).transform is not Task.transform


def run_transform(task: Task, batch: Batch, epoch: int, rng: SampleRandom) -> Batch:
    """``task.transform(batch, epoch, rng)`` where the task has one, its result checked: a tuple
    of tensors, one row per sample. A failure is a :class:`~smlt.errors.TaskError` naming it."""
    if not overrides_transform(task):
        return batch
    where = _where(task, "transform")
    out = _call(task, "transform", where, batch, epoch, rng)
    if isinstance(out, list):
        out = tuple(out)
    if not (isinstance(out, tuple) and out and all(isinstance(t, torch.Tensor) for t in out)):
        raise TaskError(
            f"{where} returned {_describe(out)}; expected a tuple of tensors like the batch it "
            "was given (e.g. 'return x, y')."
        )
    rows = len(batch[0]) if batch else 0
    lengths = [t.shape[0] if t.dim() else None for t in out]
    if any(length != rows for length in lengths):
        raise TaskError(
            f"{where} returned tensors of first dimensions {lengths} for a batch of {rows} "
            "samples; a transform keeps one row per sample."
        )
    return out


def check_transform(task: Task, head: Batch, seed: int) -> Batch:
    """Run ``transform`` on a few samples the way workers will, and check the two rules that keep
    n workers equal to one: the same draws give the same output (all randomness comes from
    ``rng``), and a sample's output does not depend on the others in its batch (smlt splits the
    batch among workers and micro-batches). Returns the transformed head (what the client's
    other checks should feed the loss). Nothing is checked when the task has no transform."""
    if not overrides_transform(task):
        return head
    from smlt.sample_random import SampleRandom

    where = _where(task, "transform")
    k = min(4, len(head[0]))
    head = tuple(t[:k] for t in head)
    indices = np.arange(k)
    first = run_transform(task, head, 0, SampleRandom(seed, 0, indices))
    again = run_transform(task, head, 0, SampleRandom(seed, 0, indices))
    if not all(torch.equal(a, b) for a, b in zip(first, again, strict=True)):
        raise TaskError(
            f"{where} gave different outputs for the same samples, epoch and rng; draw all "
            "randomness from the rng it is given (not torch.rand, random or np.random), so a "
            "re-executed iteration sees the same samples."
        )
    if k >= 2:
        half = k // 2
        parts = [
            run_transform(task, tuple(t[a:b] for t in head), 0, SampleRandom(seed, 0, indices[a:b]))
            for a, b in ((0, half), (half, k))
        ]
        split = tuple(torch.cat(pieces) for pieces in zip(*parts, strict=True))
        if not all(
            a.shape == b.shape and torch.equal(a, b) for a, b in zip(first, split, strict=True)
        ):
            raise TaskError(
                f"{where} transforms a sample differently depending on the other samples in "
                "its batch; smlt splits each batch among workers, so a transform must treat "
                "each sample on its own (per-sample draws from rng, no batch statistics)."
            )
    return first


def transformed_head(task: Task, data: TaskData | StreamData, seed: int = 0) -> TaskData:
    """The first :data:`HEAD_SAMPLES` samples as the workers' ``loss()`` will see them: through
    the task's ``transform`` (epoch 0), once :func:`check_transform` has held it to its rules.
    What every client-side check and timing of the loss runs on, so a transform that changes
    shapes (a crop) is checked as it will run. Without a transform: the head's first rows."""
    head = data.head
    rows = head.rows(0, min(HEAD_SAMPLES, head.num_samples))
    if not overrides_transform(task):
        return TaskData(rows, len(rows[0]))
    from smlt.sample_random import SampleRandom

    check_transform(task, rows, seed)
    out = run_transform(task, rows, 0, SampleRandom(seed, 0, np.arange(len(rows[0]))))
    return TaskData(out, len(out[0]))
