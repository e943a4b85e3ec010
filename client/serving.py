"""Using a trained model on the merchant's side: rank a catalogue for a query, recommend
products from a user's recent history. Both score (context, product) pairs with one head of
an exported model folder, offline; with ``offsets`` (a merchant's state folder) the scores
carry that merchant's own offsets (``client.offsets``): the same order of products, each
score on the merchant's own scale rather than the federation's average."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from client import offsets as offsets_lib
from client.data import HISTORY_SEPARATOR, DataValidationError, Problem, load_table, product_text
from shared.model import MANIFEST_FILE, load_exported, read_manifest, tokenize_pairs, trained_heads
from shared.tasks import TASK_INDEX, predictions

# The head each front door scores with.
RANK_TASK = "relevance"
RECOMMEND_TASK = "ctr"
_COMMAND = {RANK_TASK: "fedshop rank", RECOMMEND_TASK: "fedshop recommend"}


class UntrainedHeadError(ValueError):
    """The model's run never trained the head a command needs; the message names both."""


@dataclasses.dataclass(frozen=True)
class Scored:
    rank: int
    product_id: str
    title: str
    score: float


def _catalog(path: Path) -> pd.DataFrame:
    catalog = load_table(path, "catalog")
    if catalog.empty:
        raise DataValidationError([Problem(Path(path).name, None, None, "catalogue has no products")],
                                  source=str(path))
    return catalog


def _texts(catalog: pd.DataFrame) -> list[str]:
    return [product_text(str(r.title), category=str(r.category), brand=str(r.brand), description=str(r.description))
            for r in catalog.itertuples()]


@torch.no_grad()
def score_pairs(model_dir: Path, *, contexts: list[str], products: list[str], task: str,
                batch_size: int = 64, offsets: Path | None = None) -> np.ndarray:
    """Each pair's prediction on ``task``'s natural scale (probability, stars, grade), with the
    local offsets kept in the state folder ``offsets`` when one is named (``merchant_offsets``).

    Refuses (``UntrainedHeadError``) a head the model's run did not train.
    """
    require_trained(Path(model_dir), task)
    shift = merchant_offsets(Path(model_dir), offsets)
    model, tokenizer, manifest = load_exported(Path(model_dir))
    max_len = int(manifest.get("max_seq_len", 64))
    out = []
    for start in range(0, len(products), batch_size):
        enc = tokenize_pairs(tokenizer, contexts[start:start + batch_size], products[start:start + batch_size],
                             max_len, padding="longest")
        scores = model(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
        if shift is not None:
            scores = shift(scores)
        out.append(predictions(scores)[:, TASK_INDEX[task]].numpy())
    return np.concatenate(out) if out else np.zeros(0)


def merchant_offsets(model_dir: Path, state_dir: Path | None) -> offsets_lib.Offsets | None:
    """The offsets a merchant's state folder keeps for this model's heads; None when no folder
    is named. A named folder without offsets, or with another task list's, is an error
    (``client.offsets.OffsetsError``): serving the global model instead would pass unnoticed."""
    if state_dir is None:
        return None
    if not Path(state_dir).is_dir():
        raise offsets_lib.OffsetsError(f"--offsets {state_dir}: not a folder (a merchant's state folder)")
    trained = trained_heads(model_dir, read_manifest(model_dir)) or ()
    found = offsets_lib.for_node(Path(state_dir), trained)
    if found is None:
        raise offsets_lib.OffsetsError(
            f"--offsets {state_dir}: no local offsets there ({offsets_lib.OFFSETS_FILE}: a merchant's state folder "
            "after training with local-offsets = true; in simulation RUN_DIR/nodes/<merchant>)")
    return found.eval()


def require_trained(model_dir: Path, task: str) -> None:
    """Refuse a head the model's run never trained, naming it and the tasks the run trained."""
    manifest = read_manifest(model_dir)
    trained = trained_heads(model_dir, manifest)
    if trained is None:
        raise UntrainedHeadError(
            f"{model_dir / MANIFEST_FILE}: format {manifest.get('format')!r} lists every head whether its run "
            f"trained it or not, and there is no run config.json beside the model folder to tell; refusing to "
            f"score with the {task} head, which may never have been trained (re-export the model with this "
            f"version of fedshop, or train one whose tasks include {task})")
    if task not in trained:
        used_by = f" ({_COMMAND[task]} scores with it)" if task in _COMMAND else ""
        raise UntrainedHeadError(
            f"{model_dir}: the {task} head was never trained{used_by}; this model's run trained tasks = "
            f"{','.join(trained) or '(none)'}; use a model whose run config's tasks include {task}")


def _top(catalog: pd.DataFrame, scores: np.ndarray, k: int) -> list[Scored]:
    # Stable sort: equal scores keep catalogue order, so output is deterministic.
    order = np.argsort(-scores, kind="stable")[:k]
    return [Scored(rank=i + 1, product_id=str(catalog.iloc[j].product_id), title=str(catalog.iloc[j].title),
                   score=float(scores[j])) for i, j in enumerate(order)]


def rank(model_dir: Path, catalog_path: Path, query: str, *, k: int = 10,
         offsets: Path | None = None) -> list[Scored]:
    """The catalogue ordered by the relevance head's expected grade (0-3) for ``query``
    (``offsets``: a merchant's state folder whose offsets the grades carry)."""
    if not query.strip():
        raise ValueError("--query is empty")
    if k < 1:
        raise ValueError(f"-k {k}: must be >= 1")
    require_trained(Path(model_dir), RANK_TASK)  # before reading the catalogue: the cheaper refusal first
    catalog = _catalog(catalog_path)
    texts = _texts(catalog)
    scores = score_pairs(model_dir, contexts=[query] * len(texts), products=texts, task=RANK_TASK,
                         offsets=offsets)
    return _top(catalog, scores, k)


def recommend(model_dir: Path, catalog_path: Path, history_path: Path, *, k: int = 10,
              history_length: int = 3, offsets: Path | None = None) -> list[Scored]:
    """Products the user has not interacted with, by the conversion head's probability
    (``offsets``: a merchant's state folder whose offsets the probabilities carry).

    The context is the titles of the user's ``history_length`` most recent products, most
    recent first: the same context the model was trained with.
    """
    if k < 1:
        raise ValueError(f"-k {k}: must be >= 1")
    require_trained(Path(model_dir), RECOMMEND_TASK)
    catalog = _catalog(catalog_path)
    history = load_table(history_path, "interactions")
    known = set(catalog.product_id)
    unknown = [(i + 1, pid) for i, pid in enumerate(history.product_id) if pid not in known]
    if unknown:
        problems = [Problem(Path(history_path).name, row, "product_id", f"{pid!r} is not in {Path(catalog_path).name}")
                    for row, pid in unknown]
        raise DataValidationError(problems, source=str(history_path))
    stamps = [(-math.inf if math.isnan(t) else t, i) for i, t in enumerate(history.timestamp)]
    recent = [history.product_id.iloc[i] for _, i in sorted(stamps)][-history_length:][::-1]
    titles = dict(zip(catalog.product_id, catalog.title, strict=True))
    context = HISTORY_SEPARATOR.join(titles[p] for p in recent)
    seen = set(history.product_id)
    candidates = catalog[~catalog.product_id.isin(seen)].reset_index(drop=True)
    if candidates.empty:
        return []
    scores = score_pairs(model_dir, contexts=[context] * len(candidates), products=_texts(candidates),
                         task=RECOMMEND_TASK, offsets=offsets)
    return _top(candidates, scores, k)
