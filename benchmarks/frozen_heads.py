"""Study (not a test, not the system's training path): private heads on a frozen encoder.

    .venv/bin/python benchmarks/frozen_heads.py [--records-per-merchant 3000] [--epsilon 8]

Why: in ``benchmarks/utility.py`` the private reviews federation (LoRA + heads, batch 64)
stays far from centralised training. This asks how far *heads only* on a frozen MiniLM-L6
can go under the same per-merchant ε when each DP step may take many more records, which a
frozen encoder makes cheap: every record is encoded once (pooled states cached, encoder in
eval mode) and the heads then train on the cached states.

Every private call goes through the system's own DP pieces: ``client.dp.make_private``
(Opacus' Poisson loader, per-sample clipping and noise) on the model's own heads
(``FedShopModel.score``), σ from ``client.dp.noise_for_budget`` so that one call per round
fits ε per merchant (PRV accountant, δ = 1e-5), and FedAvg weighted by records. Scored on the
same held-out examples as ``utility.py`` (reviews, 1,024 per merchant), macro over merchants.

Arms: centralised non-private (the scenario's 144 steps of 64, and converged); federated
non-private and DP at the utility benchmark's schedule (4 rounds, every merchant, 6 steps of
64); DP with batches of 1,024 records (10 and 30 steps per round).
Outputs ``frozen_heads.json`` and ``frozen_heads.md`` under ``--out-dir``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from client import dp, trainer  # noqa: E402
from client.data import load_merchant  # noqa: E402
from client.merchant import merchant_dirs, split_merchant  # noqa: E402
from shared.config import RunConfig  # noqa: E402
from shared.model import FedShopModel, ModelSpec, build_model, load_tokenizer  # noqa: E402
from shared.tasks import PerExampleLoss, predictions, task_of  # noqa: E402
from simulations import adapters  # noqa: E402

log = logging.getLogger("frozen_heads")
HEADLINE = ("ctr_auc", "ctr_logloss", "rating_rmse")
ROUNDS, LOCAL_STEPS, BATCH = 4, 6, 64  # utility.py's reviews schedule


class Heads(nn.Module):
    """The model's heads (and their dropout) over cached pooled states: a ``FedShopModel`` whose
    encoder is the identity, heads copied from ``model``."""

    def __init__(self, model: FedShopModel) -> None:
        super().__init__()
        self.model = FedShopModel(nn.Identity(), hidden_size=cast(nn.Linear, model.heads["ctr"]).in_features,
                                  dropout=float(model.dropout.p))
        self.model.heads.load_state_dict(model.heads.state_dict())

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.model.score(pooled)


class Cached:
    """Pooled encoder states of each merchant's training records and held-out examples."""

    def __init__(self, work: Path, config: RunConfig, records_per_merchant: int) -> None:
        data_dir = work / "reviews"
        adapters.prepare_reviews(data_dir, overwrite=True)
        spec = ModelSpec.from_config(config)
        self.tokenizer = load_tokenizer(spec)
        self.model = build_model(spec).eval()
        self.train: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.test: dict[str, tuple[list[Any], torch.Tensor]] = {}
        generator = torch.Generator().manual_seed(0)
        for d in merchant_dirs(data_dir):
            split = split_merchant(load_merchant(d), config)
            records = trainer.PairDataset(split.train, self.tokenizer, max_seq_len=config.max_seq_len)
            keep = torch.randperm(len(records), generator=generator)[:records_per_merchant].tolist()
            self.train[d.name] = self._pool([records[i] for i in keep])
            encoded = trainer.encode(split.test, self.tokenizer, max_seq_len=config.max_seq_len)
            pooled, packed = self._pool([encoded[i] for i in range(len(encoded))])
            self.test[d.name] = (split.test, torch.cat([pooled, packed], dim=1))
            log.info("%s: %d of %d training records, %d held-out examples encoded", d.name, len(keep),
                     len(records), len(split.test))

    @torch.no_grad()
    def _pool(self, items: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        pooled, packed = [], []
        for start in range(0, len(items), 128):
            chunk = items[start:start + 128]
            ids, mask, types = (torch.stack([x[k] for x in chunk]) for k in range(3))
            pooled.append(self.model.pool(ids, mask, types))
            packed.append(torch.stack([x[3] for x in chunk]))
        return torch.cat(pooled), torch.cat(packed)

    def evaluate(self, heads: Heads) -> dict[str, dict[str, float]]:
        heads.eval()
        out = {}
        with torch.no_grad():
            for m, (examples, table) in self.test.items():
                pooled, packed = table[:, :-3], table[:, -3:]
                preds = predictions(heads(pooled)).gather(1, task_of(packed).unsqueeze(1)).squeeze(1)
                out[m] = trainer.metrics_of(examples, preds.numpy())
        heads.train()
        return out


def train_heads(heads: Heads, pooled: torch.Tensor, packed: torch.Tensor, *, steps: int, batch: int, lr: float,
                sigma: float | None, seed: int) -> Heads:
    """``steps`` AdamW steps on a copy of ``heads``; DP-SGD (Poisson, clip 1.0, noise σ) when σ is set."""
    template, heads = heads, copy.deepcopy(heads)
    heads.train()
    optimizer: Any = torch.optim.AdamW(heads.parameters(), lr=lr)
    loader = DataLoader(TensorDataset(pooled, packed), batch_size=batch, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    criterion: nn.Module = PerExampleLoss()
    model: nn.Module = heads
    if sigma is not None:
        private = dp.make_private(model=heads, optimizer=optimizer, data_loader=loader, criterion=criterion,
                                  noise_multiplier=sigma, max_grad_norm=1.0, mode="hooks", seed=seed)
        model, optimizer, loader = private.model, private.optimizer, private.data_loader
    done = 0
    while done < steps:
        for x, y in loader:
            if done >= steps:
                break
            done += 1
            if not len(x):  # an empty Poisson batch (its size depends on N only): release nothing
                continue
            optimizer.zero_grad(set_to_none=True)
            criterion(model(x), y).backward()
            optimizer.step()
    # Hand back an unwrapped module: Opacus leaves hooks and flags on the one it wrapped.
    clean = copy.deepcopy(template)
    clean.load_state_dict(heads.state_dict())
    return clean


def average(models: list[tuple[Heads, int]]) -> Heads:
    total = sum(n for _, n in models)
    out = copy.deepcopy(models[0][0])
    with torch.no_grad():
        for name, p in out.named_parameters():
            p.copy_(torch.stack([dict(m.named_parameters())[name] * (n / total) for m, n in models]).sum(0))
    return out


def federate(cached: Cached, start: Heads, *, steps: int, batch: int, lr: float, epsilon: float | None
             ) -> tuple[Heads, dict[str, float]]:
    heads, sigmas = start, dict[str, float]()
    for rnd in range(ROUNDS):
        updates = []
        for i, (m, (pooled, packed)) in enumerate(cached.train.items()):
            sigma = None
            if epsilon is not None:
                sample_rate = 1.0 / math.ceil(len(pooled) / batch)
                sigma = sigmas.setdefault(m, dp.noise_for_budget(epsilon, 1e-5, sample_rate=sample_rate, steps=steps,
                                                                  calls=ROUNDS, floor=0.3))
            updates.append((train_heads(heads, pooled, packed, steps=steps, batch=batch, lr=lr, sigma=sigma,
                                        seed=1000 * rnd + i), len(pooled)))
        heads = average(updates)
    return heads, sigmas


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records-per-merchant", type=int, default=3000)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--head-learning-rate", type=float, default=0.05)
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--cache", type=Path, default=None,
                        help="keep the encoded states in this file and reuse them on the next run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(2)
    torch.manual_seed(0)
    start = time.perf_counter()
    config = RunConfig(encoder="minilm", trainable="heads", tasks="ctr,rating", max_seq_len=48, eval_max_examples=1024)
    lr = args.head_learning_rate
    if args.cache and args.cache.exists():
        cached = torch.load(args.cache, weights_only=False)
    else:
        with tempfile.TemporaryDirectory(prefix="fedshop-frozen-") as tmp:
            cached = Cached(Path(tmp), config, args.records_per_merchant)
        if args.cache:
            torch.save(cached, args.cache)
    fresh = Heads(cached.model)
    pooled = torch.cat([p for p, _ in cached.train.values()])
    packed = torch.cat([t for _, t in cached.train.values()])
    eps = args.epsilon
    arms: dict[str, tuple[Heads, dict[str, float]]] = {
        "centralised, 144 x 64": (train_heads(fresh, pooled, packed, steps=144, batch=BATCH, lr=lr, sigma=None,
                                              seed=1), {}),
        "centralised, 1,500 x 64 (converged)": (train_heads(fresh, pooled, packed, steps=1500, batch=BATCH,
                                                            lr=lr / 5, sigma=None, seed=1), {}),
        "federated, 6 x 64 per round": federate(cached, fresh, steps=LOCAL_STEPS, batch=BATCH, lr=lr, epsilon=None),
        f"federated DP ε = {eps:g}, 6 x 64": federate(cached, fresh, steps=LOCAL_STEPS, batch=BATCH, lr=lr,
                                                     epsilon=eps),
        f"federated DP ε = {eps:g}, 10 x 1,024": federate(cached, fresh, steps=10, batch=1024, lr=lr, epsilon=eps),
        f"federated DP ε = {eps:g}, 30 x 1,024": federate(cached, fresh, steps=30, batch=1024, lr=lr, epsilon=eps),
    }
    results: dict[str, Any] = {"records_per_merchant": args.records_per_merchant, "epsilon": eps, "delta": 1e-5,
                               "rounds": ROUNDS, "arms": {}}
    for name, (heads, sigmas) in arms.items():
        per = cached.evaluate(heads)
        macro = {k: statistics.fmean(v[k] for v in per.values() if k in v) for k in HEADLINE}
        results["arms"][name] = {"macro": macro, "per_merchant": per, "sigma": sigmas}
        log.info("%s: %s", name, {k: round(v, 4) for k, v in macro.items()})
    results["seconds"] = time.perf_counter() - start
    lines = ["# Private heads on a frozen encoder (study)", "",
             f"MiniLM-L6 frozen, heads only; reviews, up to {args.records_per_merchant} training records per "
             f"merchant, ε = {eps:g} per merchant (δ = 1e-5), {ROUNDS} rounds, every merchant each round. "
             f"Run time {results['seconds'] / 60:.1f} min.", "",
             "| arm | " + " | ".join(HEADLINE) + " | σ (merchants) |", "|---|" + "---:|" * (len(HEADLINE) + 1)]
    for name, data in results["arms"].items():
        s = list(data["sigma"].values())
        sigma = f"{min(s):.2f}-{max(s):.2f}" if s else "-"
        lines.append(f"| {name} | " + " | ".join(f"{data['macro'][k]:.4f}" for k in HEADLINE) + f" | {sigma} |")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "frozen_heads.json").write_text(json.dumps(results, indent=1))
    (args.out_dir / "frozen_heads.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
