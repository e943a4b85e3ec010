"""A fast plain-PyTorch model of the private-heads benchmark, for what-ifs (not a test).

    .venv/bin/python benchmarks/heads_replica.py --dataset reviews --fold 0/5 [--seeds 4]
        [--epsilon 8] [--max-grad-norm 1.0] [--weight-decay W] [--private-weight-decay W]
        [--merge tops+trend,dresses+jackets ...] [--encode-precision float32] [--out STEM]
    .venv/bin/python benchmarks/heads_replica.py --pool STEM.json [STEM.json ...] --out STEM

``benchmarks/utility.py --trainable heads`` takes ~10 minutes a fold, most of it Flower's
simulation machinery. With a frozen encoder every head is linear on cached pooled states, so a
DP step is a few matrix products and the same arms run here in a minute or two a seed: enough
to try a setting over several seeds and folds before spending a system run on it.

It uses the system's own pieces wherever they exist: the benchmark's datasets, splits and
folds (``utility.Dataset``), the cached pooled states and the public-corpus whitening
(``client.features``, ``client.precondition``), the per-record loss and predictions
(``shared.tasks``), each merchant's σ from the merchant's own planner (``client.dp``), and the
metrics (``client.evaluation.metrics_of``). What it writes again is the training loop, in closed
form for linear heads: Poisson sampling at the accounted rate, each record's head gradient
clipped to C, Gaussian noise σ·C on the sum, divided by the expected batch (as Opacus does);
AdamW (the setting's weight decay, the DP arms' own in theirs) with each merchant's state kept
across rounds; FedAvg weighted by records.

Arms (macro over merchants, on the same held-out records as the benchmark):
``centralised`` and ``federated`` (non-private), ``federated-dp`` (each merchant its own σ for
a call every round), ``centralised-dp`` (every record in one DP learner, the centralised
arm's steps) and, per ``--merge``, the DP federation with those groups of merchants each merged
into one (more records per merchant, the same records in all), scored per original merchant.

It is a model, not the system: it reproduces the system's cross-validated reviews gaps at
C = 1 (log-loss / RMSE +5.8 / +4.1 % against the system's +5.6 / +4.1 %), but it put C = 1.25's
cost to the rating head at +0.2 % where the system measured +1.2 %. Re-run in the system
(``benchmarks/utility.py``) anything chosen here before believing it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import utility  # this folder's benchmark: its datasets, setting, steps and gap

from shared.jsonable import finite

log = logging.getLogger("heads_replica")
METRICS = utility.HEADLINE


@dataclasses.dataclass
class Merchant:
    states: torch.Tensor  # [records, hidden]: pooled (and whitened) training states
    targets: torch.Tensor  # [records, tasks]: packed targets, NaN where a record has none
    test: list[Any]  # held-out examples, as the benchmark scores them
    test_states: torch.Tensor  # [pairs, hidden]
    test_index: list[int]  # each held-out example's row of test_states


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The setting's schedule and DP-SGD knobs (from the benchmark's run config)."""

    rounds: int
    local_steps: int
    batch: int
    rate: float
    max_grad_norm: float
    delta: float
    central_steps: int
    weight_decay: float = 0.0  # AdamW's, every arm (the setting's ``weight-decay``)
    private_weight_decay: float = 0.0  # the DP arms' (``weight-decay`` in the setting's private keys)


def load(dataset: utility.Dataset) -> tuple[dict[str, Merchant], Any]:
    """Every merchant's training and held-out states, from the system's feature cache (whitened
    when the setting has a public corpus), and the whitening (None without one)."""
    from client import features, precondition
    from shared.model import ModelSpec, build_model, choose_device, load_tokenizer
    from shared.tasks import group_records, pack_targets

    config = dataset.config
    spec = ModelSpec.from_config(config)
    model, tokenizer = build_model(spec), load_tokenizer(spec)
    device = choose_device(config.device)
    # One folder per split: the feature cache keeps one record set per folder, so folds sharing
    # one would encode again every time.
    fold = dataset.fold
    cache = dataset.feature_cache / "replica" / (f"fold{fold.index}of{fold.count}" if fold else
                                                 f"split{dataset.config.split_seed}")
    whiten = None
    if config.precondition_corpus:
        whiten = precondition.from_corpus(config.precondition_corpus, model, tokenizer,
                                          max_seq_len=config.max_seq_len, device=device,
                                          cache_dir=cache / precondition.CACHE_FOLDER,
                                          precision=config.encode_precision)

    def states(pairs: list[tuple[str, str]], folder: str) -> torch.Tensor:
        x = features.pooled_states(model, tokenizer, pairs, max_seq_len=config.max_seq_len, device=device,
                                   cache_dir=cache / folder, precision=config.encode_precision).cpu()
        return (whiten.states(x) if whiten is not None else x).double()

    merchants = {}
    for name, split in dataset.splits.items():
        records = group_records(split.train)
        test = dataset.tests[name]
        pairs = sorted({(e.context, e.product) for e in test})
        row = {p: i for i, p in enumerate(pairs)}
        merchants[name] = Merchant(
            states=states([(r[0].context, r[0].product) for r in records], name),
            targets=torch.tensor([pack_targets(r) for r in records], dtype=torch.float64),
            test=test, test_states=states(pairs, f"{name}-test") if pairs else torch.zeros(0),
            test_index=[row[(e.context, e.product)] for e in test])
    return merchants, whiten


def record_gradients(heads: list[torch.Tensor], x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each record's gradient of its loss with respect to the heads' scores, ``[records, tasks]``.
    A head is linear, so record i's gradient is this row times ``[x_i, 1]`` (weights, bias)."""
    from shared.tasks import per_example_loss

    weight, bias = heads
    scores = (x @ weight.T + bias).detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(per_example_loss(scores, targets).sum(), scores)
    return grad


def clip_factors(grad: torch.Tensor, x: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """min(1, C / ‖record's gradient over every head's weights and bias‖), as flat clipping."""
    norms = grad.norm(dim=1) * (x.pow(2).sum(1) + 1.0).sqrt()
    return (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)


def train(heads: list[torch.Tensor], data: tuple[torch.Tensor, torch.Tensor], steps: int,
          optimizer: torch.optim.Optimizer | None, recipe: Recipe, generator: torch.Generator, *,
          sigma: float | None) -> tuple[list[torch.Tensor], torch.optim.Optimizer]:
    """``steps`` steps from ``heads`` on (states, targets): non-private minibatches, or DP-SGD at ``sigma``."""
    x_all, t_all = data
    heads = [h.detach().clone().requires_grad_(True) for h in heads]
    if optimizer is None:  # AdamW, as client.trainer.make_optimizer
        decay = recipe.weight_decay if sigma is None else recipe.private_weight_decay
        optimizer = torch.optim.AdamW(heads, lr=recipe.rate, weight_decay=decay)
    else:  # the merchant's kept Adam state continues on the new global heads
        for group_param, head in zip(optimizer.param_groups[0]["params"], heads, strict=True):
            group_param.data = head.data
        heads = optimizer.param_groups[0]["params"]
    n = len(x_all)
    sample_rate = 1.0 / math.ceil(n / recipe.batch)
    for _ in range(steps):
        if sigma is None:
            idx = torch.randperm(n, generator=generator)[:recipe.batch]
            grad = record_gradients(heads, x_all[idx], t_all[idx]) / len(idx)
            x = x_all[idx]
            noise_w, noise_b = torch.zeros_like(heads[0]), torch.zeros_like(heads[1])
            scale = 1.0
        else:
            idx = torch.nonzero(torch.rand(n, generator=generator, dtype=torch.float64) < sample_rate).squeeze(1)
            x = x_all[idx]
            grad = record_gradients(heads, x, t_all[idx])
            grad = grad * clip_factors(grad, x, recipe.max_grad_norm)[:, None]
            std = sigma * recipe.max_grad_norm
            noise_w = torch.randn(heads[0].shape, generator=generator, dtype=torch.float64) * std
            noise_b = torch.randn(heads[1].shape, generator=generator, dtype=torch.float64) * std
            scale = 1.0 / (sample_rate * n)  # Opacus divides by the expected batch
        heads[0].grad = (grad.T @ x + noise_w) * scale
        heads[1].grad = (grad.sum(0) + noise_b) * scale
        optimizer.step()
    return [h.detach().clone() for h in heads], optimizer


def init_heads(seed: int, hidden: int, tasks: int, whiten: Any = None) -> list[torch.Tensor]:
    """As ``nn.Linear``'s default (uniform in ±1/√hidden), then, with a whitening, in the
    coordinates the heads train in (``W' = W M⁻¹``, ``b' = b + W μ``; client.precondition)."""
    g = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(hidden)
    weight = (torch.rand(tasks, hidden, generator=g, dtype=torch.float64) * 2 - 1) * bound
    bias = (torch.rand(tasks, generator=g, dtype=torch.float64) * 2 - 1) * bound
    if whiten is None:
        return [weight, bias]
    return [weight @ whiten.inverse.double(), bias + weight @ whiten.mean.double()]


def evaluate(heads: list[torch.Tensor], merchants: dict[str, Merchant]) -> dict[str, dict[str, float]]:
    from client.evaluation import metrics_of
    from shared.tasks import TASK_INDEX, predictions

    out = {}
    for name, m in merchants.items():
        preds = predictions(m.test_states @ heads[0].T + heads[1])
        own = [float(preds[row, TASK_INDEX[e.task]]) for e, row in zip(m.test, m.test_index, strict=True)]
        out[name] = metrics_of(m.test, torch.tensor(own).numpy())
    return out


def merged(merchants: dict[str, Merchant], groups: list[list[str]]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each group's (states, targets), named by its merchants (a group of one keeps its name)."""
    return {"+".join(g): (torch.cat([merchants[m].states for m in g]), torch.cat([merchants[m].targets for m in g]))
            for g in groups}


def sigma_for(records: int, recipe: Recipe, epsilon: float, *, steps: int, calls: int) -> float:
    """The σ a merchant with ``records`` plans so that ``calls`` calls of ``steps`` fit ``epsilon``."""
    from shared.privacy import accounting

    return accounting.noise_for_budget(epsilon, recipe.delta, sample_rate=1.0 / math.ceil(records / recipe.batch),
                               steps=steps, calls=calls, max_grad_norm=recipe.max_grad_norm,
                               history=[], floor=utility.NOISE_FLOOR, hint=None)


def federate(parts: dict[str, tuple[torch.Tensor, torch.Tensor]], heads: list[torch.Tensor], recipe: Recipe,
             seed: int, sigmas: dict[str, float] | None) -> list[torch.Tensor]:
    """Every part trains every round from the global heads (its Adam state kept); FedAvg by records."""
    generator = torch.Generator().manual_seed(seed + 7)
    optimizers: dict[str, torch.optim.Optimizer | None] = dict.fromkeys(parts)
    for _ in range(recipe.rounds):
        updates = []
        for name, data in parts.items():
            local, optimizers[name] = train(heads, data, recipe.local_steps, optimizers[name], recipe, generator,
                                            sigma=None if sigmas is None else sigmas[name])
            updates.append((len(data[0]), local))
        total = sum(n for n, _ in updates)
        heads = [torch.stack([n * local[k] for n, local in updates]).sum(0) / total for k in range(2)]
    return heads


def run(merchants: dict[str, Merchant], recipe: Recipe, *, epsilon: float, seeds: int,
        partitions: list[list[list[str]]], whiten: Any = None) -> dict[str, dict[str, Any]]:
    """Every arm's per-seed macro figures and per-merchant σ; per partition of the merchants
    (groups), a DP federation of the merged groups."""
    first = next(iter(merchants.values()))
    hidden, tasks = first.states.shape[1], first.targets.shape[1]
    alone = merged(merchants, [[m] for m in merchants])  # the federation as it is: each merchant its own part
    pooled = (torch.cat([d.states for d in merchants.values()]), torch.cat([d.targets for d in merchants.values()]))
    central_sigma = sigma_for(len(pooled[0]), recipe, epsilon, steps=recipe.central_steps, calls=1)

    def private_federation(parts: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> tuple[dict[str, float], Any]:
        """Each part plans its own σ for a call every round, as a merchant does."""
        sigmas = {k: sigma_for(len(v[0]), recipe, epsilon, steps=recipe.local_steps, calls=recipe.rounds)
                  for k, v in parts.items()}
        return sigmas, lambda h, s: federate(parts, h, recipe, s, sigmas)

    arms: dict[str, Any] = {
        "centralised": (None, lambda h, s: train(h, pooled, recipe.central_steps, None, recipe,
                                                 torch.Generator().manual_seed(s), sigma=None)[0]),
        "federated": (None, lambda h, s: federate(alone, h, recipe, s, None)),
        f"federated-dp-eps-{epsilon:g}": private_federation(alone),
        f"centralised-dp-eps-{epsilon:g}": ({"all": central_sigma}, lambda h, s: train(
            h, pooled, recipe.central_steps, None, recipe, torch.Generator().manual_seed(s), sigma=central_sigma)[0]),
    }
    for partition in partitions:
        parts = merged(merchants, partition)
        arms[f"federated-dp-eps-{epsilon:g} merged {','.join(parts)}"] = private_federation(parts)
    results: dict[str, dict[str, Any]] = {}
    for name, (sigmas, fn) in arms.items():
        runs = []
        for s in range(seeds):
            per_merchant = evaluate(fn(init_heads(s, hidden, tasks, whiten), s), merchants)
            runs.append({k: utility.macro_of(per_merchant, k) for k in utility.HIGHER_IS_BETTER})
            log.info("%s seed %d: %s", name, s, {k: round(v, 4) for k, v in runs[-1].items() if math.isfinite(v)})
        results[name] = {"sigma": sigmas, "runs": runs,
                         "macro": {k: statistics.fmean(r[k] for r in runs) for k in runs[0]}}
    return results


def recipe_of(dataset: utility.Dataset, max_grad_norm: float | None, *, weight_decay: float | None = None,
              private_weight_decay: float | None = None) -> Recipe:
    """The setting's recipe; a knob given here replaces the setting's."""
    c = dataset.config
    if c.merchants_per_round < len(dataset.merchants):  # what both benchmark settings do
        raise ValueError(f"merchants-per-round = {c.merchants_per_round} of {len(dataset.merchants)} merchants: "
                         "the replica trains every merchant in every round")
    return Recipe(rounds=c.num_server_rounds, local_steps=c.max_local_steps, batch=c.batch_size,
                  rate=c.head_learning_rate, max_grad_norm=max_grad_norm or c.max_grad_norm,
                  delta=c.target_delta, central_steps=dataset.train_steps()[0],
                  weight_decay=c.weight_decay if weight_decay is None else weight_decay,
                  private_weight_decay=(dataset.private_config(8.0, calls=1).weight_decay
                                        if private_weight_decay is None else private_weight_decay))


def parse_groups(texts: list[str], merchants: list[str]) -> list[list[str]]:
    """One ``--merge`` value's groups (``a+b``): each merchant in exactly one group (the unnamed
    ones alone)."""
    groups, seen = [], set()
    for text in texts:
        group = [m for m in text.split("+") if m]
        unknown = [m for m in group if m not in merchants]
        if unknown:
            raise ValueError(f"group {text!r}: unknown merchant(s) {', '.join(unknown)} "
                             f"(the dataset has {', '.join(merchants)})")
        twice = [m for m in group if m in seen]
        if twice or len(set(group)) != len(group):
            raise ValueError(f"group {text!r}: {', '.join(twice or group)} already in a group")
        seen.update(group)
        groups.append(group)
    return groups + [[m] for m in merchants if m not in seen]


def markdown(name: str, results: dict[str, dict[str, Any]], command: str, *, averaged: str = "seeds") -> str:
    metrics = METRICS[name]
    central = results["centralised"]["macro"]
    lines = [f"# Heads replica: {name}", "", f"Command: `{command}`. Mean over {averaged}; in brackets the gap "
             "to centralised (relative, positive = worse).", "",
             "| arm | " + " | ".join(metrics) + " | σ |", "|---|" + "---:|" * (len(metrics) + 1)]
    for arm, r in results.items():
        sigma = r["sigma"] and f"{min(r['sigma'].values()):.2f}-{max(r['sigma'].values()):.2f}" or "-"
        cells = [f"{r['macro'][k]:.4f} ({utility._pct(utility.relative_gap(k, r['macro'][k], central[k]))})"
                 for k in metrics]
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {sigma} |")
    return "\n".join(lines) + "\n"


def pool(paths: list[Path]) -> tuple[str, dict[str, dict[str, Any]]]:
    """Runs of one dataset on different folds: each arm's mean over them (of its mean over
    seeds), as ``run`` returns it; the arms every run has."""
    runs = []
    for path in paths:
        try:
            runs.append(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: cannot read replica results ({exc})") from exc
    names = {r.get("dataset") for r in runs}
    if len(names) != 1:
        raise ValueError(f"the runs are of different datasets ({', '.join(map(str, names))}); pool one dataset")
    folds = [r.get("fold") for r in runs]
    if len(set(folds)) != len(folds):
        raise ValueError(f"a fold appears twice ({', '.join(map(str, folds))}); each fold may count once")
    arms = [a for a in runs[0]["arms"] if all(a in r["arms"] for r in runs)]
    def sigmas(arm: str) -> dict[str, float]:  # the range over every run's merchants
        values = [v for r in runs for v in (r["arms"][arm]["sigma"] or {}).values()]
        return {"least": min(values), "most": max(values)} if values else {}

    pooled = {a: {"sigma": sigmas(a),
                  "runs": [r["arms"][a]["macro"] for r in runs],
                  "macro": {k: _mean(r["arms"][a]["macro"][k] for r in runs)
                            for k in runs[0]["arms"][a]["macro"]}} for a in arms}
    return str(runs[0]["dataset"]), pooled


def _mean(values: Any) -> float:
    """Mean of the finite values (a metric the dataset lacks is stored as null): NaN if none."""
    finite_values = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.fmean(finite_values) if finite_values else math.nan


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=sorted(METRICS), default="reviews")
    parser.add_argument("--fold", help="k/K: hold out fold k of K (as utility.py --fold); default the scenario's split")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--max-grad-norm", type=float, default=None, help="C (default: the setting's)")
    parser.add_argument("--weight-decay", type=float, default=None,
                        help="AdamW's weight decay in the non-private arms (default: the setting's)")
    parser.add_argument("--private-weight-decay", type=float, default=None,
                        help="AdamW's weight decay in the DP arms (default: the setting's for them)")
    parser.add_argument("--merge", action="append", default=[], metavar="A+B,C+D",
                        help="an extra DP federation with each group merged into one merchant (the merchants "
                             "not named stay alone); repeatable, one federation each")
    parser.add_argument("--encoder", default="minilm")
    parser.add_argument("--encode-precision", choices=("auto", "float32", "bfloat16"), default=None,
                        help="the frozen encoder's arithmetic for the cached states (default: the setting's)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "fedshop-replica",
                        help="data and feature cache (reused between runs)")
    parser.add_argument("--out", type=Path, help="write STEM.json and STEM.md")
    parser.add_argument("--pool", nargs="+", type=Path, metavar="JSON",
                        help="instead of training: each arm's mean over these runs' folds (with --out)")
    args = parser.parse_args()
    command = "python benchmarks/heads_replica.py " + " ".join(sys.argv[1:])
    if args.pool:
        try:
            name, results = pool(args.pool)
        except ValueError as exc:
            parser.error(str(exc))
        return write(name, results, command, args.out, extra={"pooled": [str(p) for p in args.pool]},
                     averaged="the runs (each the mean over its seeds)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        fold = utility.Fold.parse(args.fold) if args.fold else None
        if args.seeds < 1:
            raise ValueError(f"--seeds {args.seeds}: need at least 1")
        for flag, value in (("--weight-decay", args.weight_decay),
                            ("--private-weight-decay", args.private_weight_decay)):
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{flag} {value}: must be a finite number >= 0")
        dataset = utility.Dataset(args.dataset, args.work / args.dataset, encoder=args.encoder, quick=False,
                                  setting=utility.SETTINGS["heads"], fold=fold)
        if args.encode_precision:
            dataset.config = dataset.config.replace(encode_precision=args.encode_precision)
        partitions = [parse_groups(text.split(","), dataset.merchants) for text in args.merge]
        recipe = recipe_of(dataset, args.max_grad_norm, weight_decay=args.weight_decay,
                           private_weight_decay=args.private_weight_decay)
    except ValueError as exc:
        parser.error(str(exc))
    merchants, whiten = load(dataset)
    results = run(merchants, recipe, epsilon=args.epsilon, seeds=args.seeds,
                  partitions=partitions, whiten=whiten)
    return write(args.dataset, results, command, args.out, extra={"fold": args.fold})


def write(name: str, results: dict[str, dict[str, Any]], command: str, out: Path | None, *,
          extra: dict[str, Any], averaged: str = "seeds") -> int:
    """Print the table; with ``out``, STEM.md and STEM.json beside it."""
    text = markdown(name, results, command, averaged=averaged)
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        utility.write_atomic(utility.with_extension(out, ".json"), json.dumps(finite(
            {"dataset": name, **extra, "command": command, "arms": results}), indent=1))
        utility.write_atomic(utility.with_extension(out, ".md"), text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
