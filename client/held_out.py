"""A merchant's exact view of a model: its scores on the merchant's own held-out records, beside
the constant predictors it has to beat.

What a private merchant *releases* about a model is noised (``client.release``: σ_eval 10 by
default, so a figure of one merchant can move by ±0.3 RMSE, and a constant's RMSE computed from
noised sums can come out as 0). What it can *see* on its own machine is exact and costs no ε:
the model is the run's public output, and the records never leave. This module computes that
view: for each task the model's exact metrics on every held-out record of the merchant (the
split the run used, ``client.merchant.split_merchant`` under the run's config), and the
constants' scores on the same records:

- ``<task>_<score>_held_out``: the constant at the held-out base rate / mean, the best any
  constant can do there (an oracle: it knows the held-out labels);
- ``<task>_<score>_train``: the constant at the training set's base rate / mean, what the
  merchant knows without any model;
- ranking: NDCG@10 / MRR of a random order of the same candidates (``shared.metrics``).

``fedshop evaluate`` prints it per merchant, and ``fedshop simulate`` ends with it (in simulation
one person holds every merchant's data, and the console is every merchant's own log); the
benchmarks score runs through it. Nothing here is sent or written where the operator reads it
(docs/privacy.md, "A merchant's own view").
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from client.data import DataValidationError, load_merchant
from client.data.schema import TABLES
from client.merchant import NodeConfigError, merchant_dirs, simulated_state_dir, split_merchant
from shared.config import RunConfig
from shared.run_files import CONFIG_FILE, MODEL_DIR

# What a model's figure is checked against, per task: (its metric, the constant's key, lower is better).
CHECKS: tuple[tuple[str, str, str, bool], ...] = (
    ("ctr", "ctr_logloss", "ctr_logloss_held_out", True),
    ("rating", "rating_rmse", "rating_rmse_held_out", True),
    ("relevance", "relevance_rmse", "relevance_rmse_held_out", True),
    ("relevance", "relevance_ndcg@10", "relevance_ndcg@10_baseline", False),
)


# What the table's marks mean, for the line above it.
LEGEND = ("✓: the model beats the constant at the held-out base rate / mean (NDCG: a random order); computed on "
          "the machine that holds the records, released nowhere")

# The expected ranking figures of a random order of the same candidates (shared.metrics).
RANDOM_ORDER = ("relevance_ndcg@10_baseline", "relevance_mrr_baseline")


class HeldOutError(ValueError):
    """A run folder or merchant folder that cannot be scored; the message names it."""


def _log_loss(y: np.ndarray, p: float) -> float:
    p = min(max(p, 1e-7), 1 - 1e-7)
    return float(-(y * math.log(p) + (1 - y) * math.log(1 - p)).mean())


def constant_scores(train: Sequence[Any], test: Sequence[Any]) -> dict[str, float]:
    """The constant predictors' scores on ``test``: at the held-out base rate / mean and at the
    training set's (``ctr_logloss_held_out``, ``rating_rmse_train``, ...)."""
    out: dict[str, float] = {}
    for task, scored in (("ctr", "logloss"), ("rating", "rmse"), ("relevance", "rmse")):
        y = np.array([e.target for e in test if e.task == task], dtype=float)
        y_train = np.array([e.target for e in train if e.task == task], dtype=float)
        if not y.size:
            continue
        for name, value in (("held_out", float(y.mean())), ("train", float(y_train.mean()) if y_train.size else None)):
            if value is None:
                continue
            if scored == "logloss":
                out[f"{task}_logloss_{name}"] = _log_loss(y, value)
            else:
                out[f"{task}_rmse_{name}"] = float(np.sqrt(((y - value) ** 2).mean()))
    return out


def beats_constants(scores: Mapping[str, float]) -> dict[str, bool]:
    """Per ``CHECKS`` figure that ``scores`` holds with its constant: whether the model beats it."""
    return {metric: (scores[metric] < scores[constant]) if lower else (scores[metric] > scores[constant])
            for _, metric, constant, lower in CHECKS if metric in scores and constant in scores}


@dataclasses.dataclass(frozen=True)
class MerchantView:
    """One merchant's exact scores of a model on its held-out records, and the constants'."""

    merchant: str
    held_out_examples: int
    metrics: dict[str, float]  # the model's (shared.metrics keys), with the merchant's offsets if any
    constants: dict[str, float]  # constant_scores, plus the random order's ranking figures
    offsets: bool  # scored with the merchant's own local offsets (client.offsets)
    problem: str = ""  # why the merchant could not be scored (its folder fails validation, ...)

    def beats_constants(self) -> dict[str, bool]:
        """Per checked figure the model has: whether it beats the held-out constant (random order)."""
        return beats_constants({**self.metrics, **self.constants})

    def to_json(self) -> dict[str, Any]:
        return {"merchant": self.merchant, "held_out_examples": self.held_out_examples, "offsets": self.offsets,
                "metrics": self.metrics, "constants": self.constants, "beats_constants": self.beats_constants(),
                **({"problem": self.problem} if self.problem else {})}


def has_model(run_dir: Path) -> bool:
    """Whether the run finished with an exported model to score."""
    return (Path(run_dir) / MODEL_DIR / "fedshop.json").is_file()


def run_config(run_dir: Path, own: Mapping[str, Any] | None = None) -> RunConfig:
    """The run's config as saved in ``RUN_DIR/config.json``, every held-out unit evaluated.
    ``own``: run-config keys the merchant pinned for itself (a deployed node's split keys:
    ``test-fraction``, ``test-offset``, ``split-seed``, ``privacy-unit``...), which decided its
    split instead of the run's (``client.policy``)."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise HeldOutError(f"{run_dir}: no {CONFIG_FILE} (not a fedshop run folder)")
    if not has_model(run_dir):
        raise HeldOutError(f"{run_dir}: no exported model in {MODEL_DIR}/ (the run did not finish)")
    return RunConfig.from_mapping({**json.loads(path.read_text()), **(own or {}), "eval-max-examples": 0})


def merchant_folders(paths: Sequence[Path]) -> list[Path]:
    """Merchant folders from ``paths``: each a merchant folder, or a folder of them."""
    out: list[Path] = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise HeldOutError(f"--data {path}: not a folder")
        is_merchant = any(p.is_file() and p.stem in TABLES for p in path.iterdir())  # else a folder of them
        out += [path] if is_merchant else merchant_dirs(path)
    return out


def views(run_dir: Path, data: Sequence[Path] | None = None, *, offsets_dir: Path | None = None,
          own: Mapping[str, Any] | None = None) -> Iterator[MerchantView]:
    """Each merchant's exact view of the run's exported model. ``data``: merchant folders (or
    folders of them), by default the run's ``data-dir``. Offsets and cached states come from the
    merchant's simulated node folder (``RUN_DIR/nodes/<merchant>``) when it has one, else from
    ``offsets_dir`` (a deployed merchant's state folder; one merchant only). ``own``: the
    merchant's own pinned keys (``run_config``)."""
    from client import evaluation, offsets
    from shared.model import load_exported

    run_dir = Path(run_dir)
    config = run_config(run_dir, own)
    if not data and not Path(config.data_dir).is_dir():
        raise HeldOutError(f"the run's data-dir {config.data_dir!r} is not a folder from here; name the merchants' "
                           "folders with --data")
    folders = merchant_folders(data or [Path(config.data_dir)])
    if offsets_dir is not None and len(folders) != 1:
        raise HeldOutError(f"--offsets {offsets_dir}: one merchant's state folder, but --data holds {len(folders)} "
                           "merchants")
    model, tokenizer, manifest = load_exported(run_dir / MODEL_DIR)
    for folder in folders:
        node = simulated_state_dir(run_dir, folder.name)
        state = node if node.is_dir() else offsets_dir
        shift = offsets.for_node(state, manifest["heads"]) if state is not None else None
        try:
            split = split_merchant(load_merchant(folder), config)
        except (DataValidationError, NodeConfigError) as exc:  # the others are still scored
            yield MerchantView(merchant=folder.name, held_out_examples=0, metrics={}, constants={}, offsets=False,
                               problem=" ".join(line.strip() for line in str(exc).splitlines()[:2]))
            continue
        # The node's own cache (same records, same frozen encoder: its states are reused).
        cache = node / "features" if node.is_dir() else None
        exact = evaluation.evaluate(model, split.test, tokenizer, config, feature_cache=cache, offsets=shift)
        # shared.metrics' own ``_baseline`` figures: the held-out constants again, and the random
        # order's ranking figures (kept, as the ranking's constant).
        ranking = {k: v for k, v in exact.metrics.items() if k in RANDOM_ORDER}
        yield MerchantView(merchant=folder.name, held_out_examples=len(split.test),
                           metrics={k: v for k, v in exact.metrics.items() if not k.endswith("_baseline")},
                           constants={**constant_scores(split.train, split.test), **ranking},
                           offsets=shift is not None)


def table(merchant_views: Sequence[MerchantView]) -> str:
    """The views as a plain-text table: each checked figure beside its constant, ✓ where it beats it."""
    columns = [(metric, constant, lower) for _, metric, constant, lower in CHECKS
               if any(metric in v.metrics for v in merchant_views)]
    extra = [m for m in ("ctr_auc",) if any(m in v.metrics for v in merchant_views)]
    names = {"ctr_logloss": "log-loss (base rate)", "rating_rmse": "rating RMSE (mean)",
             "relevance_rmse": "relevance RMSE (mean)", "relevance_ndcg@10": "NDCG@10 (random order)",
             "ctr_auc": "AUC"}
    width = max([8, *(len(v.merchant) for v in merchant_views)])
    head = f"{'merchant':<{width}}  {'examples':>8}  " + "  ".join(f"{names[m]:<24}" for m, _, _ in columns)
    head += "".join(f"  {names[m]:>7}" for m in extra)
    lines = [head.rstrip()]
    for v in merchant_views:
        if v.problem:
            lines.append(f"{v.merchant:<{width}}  not scored: {v.problem}")
            continue
        both, wins = {**v.metrics, **v.constants}, v.beats_constants()
        cells = []
        for metric, constant, _ in columns:
            if metric in both and constant in both:
                cells.append(f"{both[metric]:.3f} ({both[constant]:.3f}) {'✓' if wins[metric] else '✗'}".ljust(24))
            else:
                cells.append("-".ljust(24))
        line = f"{v.merchant:<{width}}  {v.held_out_examples:>8}  " + "  ".join(cells)
        line += "".join(f"  {v.metrics[m]:>7.3f}" if m in v.metrics else f"  {'-':>7}" for m in extra)
        lines.append(line.rstrip())
    return "\n".join(lines)
