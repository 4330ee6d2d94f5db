from __future__ import annotations

import inspect
from types import ModuleType

import pytest

import smlt
from smlt import errors


@pytest.mark.parametrize("module", [smlt, errors], ids=lambda m: m.__name__)
def test_all_is_sorted_and_resolves(module: ModuleType) -> None:
    assert list(module.__all__) == sorted(module.__all__)
    for name in module.__all__:
        assert getattr(module, name) is not None


def test_every_error_is_in_the_tree_and_exported() -> None:
    classes = {
        name
        for name, obj in vars(errors).items()
        if inspect.isclass(obj) and issubclass(obj, Exception) and obj.__module__ == errors.__name__
    }
    assert classes == set(errors.__all__)
    for name in classes:
        cls = getattr(errors, name)
        assert issubclass(cls, errors.SmltError) or issubclass(cls, errors.SmltWarning)
        # The docstring draws the tree: every class appears in it.
        assert name in (errors.__doc__ or "")
