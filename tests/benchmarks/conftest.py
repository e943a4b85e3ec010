"""The benchmark scripts under test, loaded as modules the way they run."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/NAME.py`` as module ``NAME``: with its folder on sys.path while it loads (a
    script imports its siblings, e.g. ``import utility``) and in sys.modules (dataclasses
    look their module up by name)."""
    if name in sys.modules:
        return sys.modules[name]
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


@pytest.fixture(scope="module")
def utility() -> ModuleType:
    return load_benchmark("utility")


@pytest.fixture(scope="module")
def splits() -> ModuleType:
    return load_benchmark("utility_splits")


@pytest.fixture(scope="module")
def replica() -> ModuleType:
    return load_benchmark("heads_replica")
