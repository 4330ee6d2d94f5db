"""The Task contract: every way a task file can be wrong gets a TaskError that says where."""

from __future__ import annotations

import math
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from smlt.errors import ConfigError, TaskError
from smlt.task import (
    Task,
    check_loss,
    check_model,
    check_optimizer,
    check_task,
    load_task,
    run_evaluate,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# A valid task whose methods the tests below override one at a time.
GOOD = """
import torch
from smlt.task import Task

class Good(Task):
    def data(self):
        return torch.arange(12, dtype=torch.float32).reshape(6, 2), torch.arange(6) % 2
    def model(self):
        torch.manual_seed(0)
        return torch.nn.Linear(2, 2)
    def optimizer(self, model):
        return torch.optim.SGD(model.parameters(), lr=0.1)
    def loss(self, model, batch):
        x, y = batch
        return torch.nn.functional.cross_entropy(model(x), y)
"""


def write(tmp_path: Path, source: str, name: str = "task.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return path


def task_with(tmp_path: Path, method: str, body: str) -> Task:
    """Good, with one method replaced by ``body`` (a one-line return expression or statement)."""
    source = GOOD + f"\nclass Bad(Good):\n    def {method}(self, *args):\n        {body}\n"
    return load_task(f"{write(tmp_path, source)}:Bad")


def test_good_task_loads_and_validates(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    task = load_task(f"{path}:Good")
    assert isinstance(task, Task)
    data = check_task(task)
    assert data.num_samples == 6
    assert data.dtypes == (torch.float32, torch.int64)
    assert data.sample_shapes == ((2,), ())
    assert data.bytes_per_sample == 2 * 4 + 8
    model = check_model(task)
    check_optimizer(task, model)
    loss = check_loss(task, model, data.rows(0, 2))
    assert loss.dim() == 0 and math.isfinite(loss.item())
    assert run_evaluate(task, model) == {}


def test_file_folder_is_not_left_on_sys_path(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    load_task(f"{path}:Good")
    assert str(tmp_path) not in sys.path


def test_two_files_with_the_same_name_do_not_collide(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = write(tmp_path / "a", GOOD)
    second = write(tmp_path / "b", GOOD.replace("class Good", "class Other"))
    good, other = type(load_task(f"{first}:Good")), type(load_task(f"{second}:Other"))
    assert (good.__name__, other.__name__) == ("Good", "Other")
    assert good.__module__ != other.__module__


def test_sibling_module_import_works_during_load(tmp_path: Path) -> None:
    (tmp_path / "helpers_for_smlt_test.py").write_text("WIDTH = 2\n")
    path = write(tmp_path, "from helpers_for_smlt_test import WIDTH\n" + GOOD)
    assert isinstance(load_task(f"{path}:Good"), Task)


@pytest.mark.parametrize("spec", ["task.py", "task.py:", ":Good"])
def test_spec_without_colon_or_parts(spec: str) -> None:
    with pytest.raises(TaskError, match="path/to/file.py:ClassName"):
        load_task(spec)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TaskError, match=r"nope\.py.*does not exist"):
        load_task(f"{tmp_path / 'nope.py'}:Good")


def test_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "import torch\n\ndef broken(:\n    pass\n")
    with pytest.raises(TaskError, match=r"task\.py has a syntax error at line 3") as info:
        load_task(f"{path}:Good")
    assert str(path) in str(info.value)


def test_import_error_inside_file(tmp_path: Path) -> None:
    path = write(tmp_path, "import torch\nimport smlt_no_such_package_xyz\n")
    with pytest.raises(TaskError, match="smlt_no_such_package_xyz") as info:
        load_task(f"{path}:Good")
    message = str(info.value)
    assert str(path) in message and "line 2" in message and "failed to import" in message


def test_other_exception_at_import(tmp_path: Path) -> None:
    path = write(tmp_path, "x = 1\nraise RuntimeError('boom at import')\n")
    with pytest.raises(TaskError, match="RuntimeError.*boom at import.*line 2"):
        load_task(f"{path}:Good")


def test_class_missing_lists_candidates(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    with pytest.raises(TaskError, match=r"no class 'Goood'.*Task subclasses in the file: Good"):
        load_task(f"{path}:Goood")


def test_class_not_a_task_subclass(tmp_path: Path) -> None:
    path = write(tmp_path, "class Plain:\n    def data(self):\n        return ()\n")
    with pytest.raises(TaskError, match=r"Plain in task file .*task\.py is not a subclass"):
        load_task(f"{path}:Plain")


def test_name_that_is_not_a_class(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD + "\nvalue = 3\n")
    with pytest.raises(TaskError, match="not a subclass of smlt.Task"):
        load_task(f"{path}:value")


def test_missing_required_method(tmp_path: Path) -> None:
    source = GOOD + "\nclass Half(Task):\n    def data(self):\n        return (1,)\n"
    with pytest.raises(TaskError, match=r"Half .* does not define model\(\), optimizer\(\), loss"):
        load_task(f"{write(tmp_path, source)}:Half")


def test_constructor_error(tmp_path: Path) -> None:
    source = GOOD + "\nclass Needy(Good):\n    def __init__(self, size):\n        pass\n"
    with pytest.raises(TaskError, match=r"Needy\(\) in task file .* raised TypeError"):
        load_task(f"{write(tmp_path, source)}:Needy")


def test_data_unequal_lengths(tmp_path: Path) -> None:
    task = task_with(tmp_path, "data", "return torch.zeros(5, 2), torch.zeros(4)")
    with pytest.raises(TaskError, match=r"Bad\.data\(\) in task file .*unequal length \[5, 4\]"):
        check_task(task)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("return torch.zeros(5, 2)", "returned a tensor of shape"),
        ("return {'x': torch.zeros(3)}", "returned a dict"),
        ("return None", "returned None"),
        ("return torch.zeros(3), [1, 2, 3]", "element 1 as a list"),
        ("import numpy as np; return (np.array(['a', 'b']),)", "element 0 as a numpy array"),
        ("return (torch.tensor(1.0),)", "0-dimensional"),
    ],
)
def test_data_wrong_types(tmp_path: Path, body: str, expected: str) -> None:
    task = task_with(tmp_path, "data", body)
    with pytest.raises(TaskError, match=r"Bad\.data\(\)") as info:
        check_task(task)
    assert expected in str(info.value)


@pytest.mark.parametrize(
    "body", ["return ()", "return torch.zeros(0, 3), torch.zeros(0)", "return []"]
)
def test_data_empty(tmp_path: Path, body: str) -> None:
    with pytest.raises(TaskError, match=r"Bad\.data\(\) .*(empty|no samples)"):
        check_task(task_with(tmp_path, "data", body))


def test_data_raising_is_wrapped_with_line(tmp_path: Path) -> None:
    task = task_with(tmp_path, "data", "raise OSError('disk gone')")
    with pytest.raises(TaskError, match=r"Bad\.data\(\) .*raised OSError: disk gone.*line \d+"):
        check_task(task)


def test_numpy_arrays_become_tensors(tmp_path: Path) -> None:
    body = "import numpy as np; return np.ones((4, 3))[:, ::-1], np.arange(4)"
    data = check_task(task_with(tmp_path, "data", body))
    assert data.dtypes == (torch.float64, torch.int64)
    assert data.tensors[0].is_contiguous()
    assert torch.equal(data.tensors[1], torch.arange(4))


class PairDataset(Dataset[tuple[torch.Tensor, int]]):
    def __len__(self) -> int:
        return 5

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.full((3,), float(i)), i * 10


class DatasetTask(Task):
    def data(self) -> Dataset[tuple[torch.Tensor, int]]:
        return PairDataset()


def test_dataset_is_materialized() -> None:
    data = check_task(DatasetTask())
    assert data.num_samples == 5
    assert torch.equal(data.tensors[0][:, 0], torch.arange(5, dtype=torch.float32))
    assert data.tensors[1].tolist() == [0, 10, 20, 30, 40]


def test_model_not_a_module(tmp_path: Path) -> None:
    task = task_with(tmp_path, "model", "return lambda x: x")
    with pytest.raises(TaskError, match=r"Bad\.model\(\) .*expected a torch\.nn\.Module"):
        check_model(task)


def test_optimizer_not_an_optimizer(tmp_path: Path) -> None:
    task = task_with(tmp_path, "optimizer", "return 0.1")
    with pytest.raises(TaskError, match=r"Bad\.optimizer\(\) .*returned a float.*Optimizer"):
        check_optimizer(task, torch.nn.Linear(2, 2))


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("return 0.5", "returned a float"),
        ("return args[0](args[1][0]).sum(dim=1)", "shape (2,)"),
        ("return torch.tensor(3)", "torch.int64"),
        ("return torch.tensor(0.5)", "does not depend on the model"),
        ("return args[0](args[1][0][:, :1]).sum()", "raised RuntimeError"),
    ],
)
def test_loss_not_a_scalar(tmp_path: Path, body: str, expected: str) -> None:
    task = task_with(tmp_path, "loss", body)
    data = check_task(task)
    with pytest.raises(TaskError, match=r"Bad\.loss\(\)") as info:
        check_loss(task, check_model(task), data.rows(0, 2))
    assert expected in str(info.value)


def test_evaluate_must_return_numbers(tmp_path: Path) -> None:
    task = task_with(tmp_path, "evaluate", "return {'accuracy': 'high'}")
    with pytest.raises(TaskError, match=r"Bad\.evaluate\(\) .*'accuracy'"):
        run_evaluate(task, torch.nn.Linear(2, 2))


def test_task_error_is_a_config_error() -> None:
    assert issubclass(TaskError, ConfigError)


@pytest.mark.parametrize(
    ("spec", "num_samples", "sample_shapes"),
    [
        ("digits.py:Digits", 1347, ((64,), ())),
        ("resnet18.py:ResNet18", 2048, ((3, 32, 32), ())),
        ("transformer.py:Transformer", 4096, ((32,), ())),
        ("transformer.py:TransformerWarmupCosine", 4096, ((32,), ())),
    ],
)
def test_examples_load_and_give_a_finite_scalar_loss(
    spec: str, num_samples: int, sample_shapes: tuple[tuple[int, ...], ...]
) -> None:
    task = load_task(str(EXAMPLES / spec))
    data = check_task(task)
    assert data.num_samples == num_samples
    assert data.sample_shapes == sample_shapes
    labels = data.tensors[1]
    assert labels.dtype == torch.int64 and len(torch.unique(labels)) >= 2
    model = check_model(task)
    check_optimizer(task, model)
    loss = check_loss(task, model, data.rows(0, 4))
    assert math.isfinite(loss.item()) and loss.item() > 0
    # Deterministic: a second call gives the same data and the same initial weights.
    again = check_task(task)
    assert all(torch.equal(a, b) for a, b in zip(data.tensors, again.tensors, strict=True))
    first = next(model.parameters())
    assert torch.equal(first, next(task.model().parameters()))


def test_digits_evaluate_reports_held_out_metrics() -> None:
    task = load_task(f"{EXAMPLES / 'digits.py'}:Digits")
    metrics = run_evaluate(task, task.model())
    assert set(metrics) == {"accuracy", "loss"}
    assert 0.0 <= metrics["accuracy"] <= 0.3  # an untrained model is near chance (0.1)
    assert metrics["loss"] == pytest.approx(np.log(10), rel=0.2)
