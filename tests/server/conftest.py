"""Fixtures shared by the audit and privacy-report tests: a clean run (and one with evaluation
releases), copied per test."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.helpers.audit_runs import build_run


@pytest.fixture(scope="module")
def clean_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_run(tmp_path_factory.mktemp("template") / "run")


@pytest.fixture
def run_dir(clean_template: Path, tmp_path: Path) -> Path:
    """A private copy of the clean run: tests may tamper with it."""
    return Path(shutil.copytree(clean_template, tmp_path / "run"))


@pytest.fixture(scope="module")
def evaluated_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_run(tmp_path_factory.mktemp("evaluated") / "run", evaluations=True)


@pytest.fixture
def eval_run_dir(evaluated_template: Path, tmp_path: Path) -> Path:
    """A private copy of a clean run whose merchants also released an evaluation every round."""
    return Path(shutil.copytree(evaluated_template, tmp_path / "run"))
