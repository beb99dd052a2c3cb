"""Training-loop overhead of ``nnpipe.NNClassifier.fit`` against a hand-written PyTorch loop.

Run from the repository root::

    python benchmarks/bench_fit_overhead.py              # 7 repeats x 20 epochs (~3-4 min on 2 cores)
    python benchmarks/bench_fit_overhead.py --quick      # 2 repeats, smoke run

Project target: nnpipe's fit wall time <= 1.10x the hand-written loop (plain skorch's default
was measured at 1.39x on a small 1-D CNN).

What is compared
----------------
Data: scikit-learn ``load_digits`` (1797 x 64), ``X / 16`` as float32, a 25 % stratified test
split with ``random_state=0``; every variant trains on the same 75 % (1347 rows, 22 batches of
64 per epoch, the last one of 3 rows).

Networks: nnpipe's ``MLP(64, 10)`` (default hidden sizes 256-128) and
``CNN2d(64, 10, input_shape=(1, 8, 8))`` (default channels 32-64, dense 128). All variants use
the very same module class with the same constructor arguments, Adam with lr=1e-3,
``nn.CrossEntropyLoss``, batch size 64, the same number of epochs, per-epoch reshuffling and no
validation split.

Variants, timed interleaved (A, B, C, D, E, A, B, C, D, E, ...) for each network:

* ``hand``      - the baseline: a typical user loop. Tensors in memory, per epoch
                  ``torch.randperm`` + one gather, contiguous slices of 64,
                  ``zero_grad / forward / loss / backward / step`` and the epoch loss logged via
                  a per-batch ``loss.item()``. Choice: a realistic user loop logs the epoch loss,
                  and nnpipe/skorch also call ``loss.item()`` once per batch (skorch records the
                  batch loss in its history), so this is the like-for-like baseline.
* ``hand_min``  - the same loop without any ``.item()`` (the strictest baseline: nothing but the
                  optimisation). On the CPU ``.item()`` costs a few microseconds, so the two hand
                  loops are usually indistinguishable; both ratios are reported.
* ``nnpipe``    - ``NNClassifier(module=..., max_epochs=E, batch_size=64, lr=1e-3,
                  optimizer="adam", train_split=None, random_state=0, verbose=0).fit(Xtr, ytr)``.
* ``skorch``    - plain ``skorch.NeuralNetClassifier`` with the same module class
                  (``module__n_features=64, module__n_outputs=10`` ...),
                  ``criterion=nn.CrossEntropyLoss``, ``optimizer=torch.optim.Adam``,
                  ``train_split=None``, ``verbose=0`` and skorch's default ``DataLoader``
                  (``iterator_train__shuffle=True`` so that it reshuffles every epoch like the
                  others; skorch does not shuffle by default).

What is timed
-------------
Wall time (``time.perf_counter``) of everything from the construction of the network to the end of
training: for the hand loops the module and optimizer construction plus the loop (the data is
already a tensor, made before the timer starts); for nnpipe and skorch the estimator construction
plus ``.fit(Xtr, ytr)`` on numpy arrays (so their input validation, label encoding and
array->tensor conversion count, as a user pays them). Imports and data loading are not timed.
Module construction is ~1 ms, i.e. negligible next to the ~0.5-5 s training runs.

``gc.collect()`` runs before every timed run (garbage collection stays enabled during it). Before
the timed repeats every variant runs once untimed (warm-up: lazy imports, allocator, oneDNN
primitive caches).

Threads: ``torch.set_num_threads(1)`` (and 1 inter-op thread) for every variant by default
(``--threads``). The machine has 2 cores and is shared/noisy; one thread keeps the runs stable, and
for these tiny batches intra-op parallelism gives little. The same setting applies to all variants.

Seeding: the hand loops seed torch's global generator with 0 and then build the module and draw the
permutations in the same order as nnpipe (which forks the RNG and seeds it with ``random_state=0``).
So ``hand``, ``hand_min`` and ``nnpipe`` do bit-for-bit the same arithmetic, and the script checks
that their final training losses agree (the ``check`` column): the timing difference is pure
framework overhead. skorch's ``DataLoader`` draws its permutations differently, so its loss differs
slightly.

Reported: per network the median seconds of each variant over the repeats, the ratio of medians
(``nnpipe/hand`` ...), the median of the per-repeat ratios (each repeat's variants ran back to
back, so this one is more robust to slow drifts of the machine's load) and the per-batch overhead
in microseconds ``(median nnpipe - median hand) / (epochs * batches)``. Results also go to
``benchmarks/results/fit_overhead.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import sklearn
import skorch
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

import nnpipe  # noqa: E402
from nnpipe import NNClassifier  # noqa: E402
from nnpipe.models import CNN2d, MLP  # noqa: E402

BATCH_SIZE = 64
LR = 1e-3
SEED = 0
TARGET = 1.10

NETWORKS = {
    # name: (nnpipe module name, nnpipe estimator kwargs, module class, module kwargs)
    "mlp": ("mlp", {}, MLP, {}),
    "cnn2d": ("cnn2d", {"input_shape": (1, 8, 8)}, CNN2d, {"input_shape": (1, 8, 8)}),
}
VARIANTS = ("hand", "hand_min", "nnpipe", "skorch")


# --------------------------------------------------------------------------- data


def load_data():
    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    y = y.astype(np.int64)
    Xtr, _, ytr, _ = train_test_split(X, y, test_size=0.25, stratify=y, random_state=SEED)
    return np.ascontiguousarray(Xtr), np.ascontiguousarray(ytr)


# --------------------------------------------------------------------------- the variants


def make_module(net):
    _, _, cls, kwargs = NETWORKS[net]
    return cls(64, 10, **kwargs)


def run_hand(net, Xt, yt, epochs, log_loss=True):
    """The hand-written loop; returns the last epoch's mean training loss (or nan)."""
    torch.manual_seed(SEED)
    model = make_module(net)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    loss_fn = nn.CrossEntropyLoss()
    n = len(Xt)
    last = math.nan
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(n)
        Xs, ys = Xt[perm], yt[perm]
        total = 0.0
        for start in range(0, n, BATCH_SIZE):
            xb, yb = Xs[start:start + BATCH_SIZE], ys[start:start + BATCH_SIZE]
            opt.zero_grad()
            loss = loss_fn(model(xb), yb)
            loss.backward()
            opt.step()
            if log_loss:
                total += loss.item() * len(xb)
        if log_loss:
            last = total / n
    return last


def run_nnpipe(net, Xtr, ytr, epochs):
    module, kwargs, _, _ = NETWORKS[net]
    clf = NNClassifier(module=module, max_epochs=epochs, batch_size=BATCH_SIZE, lr=LR,
                       optimizer="adam", train_split=None, random_state=SEED, verbose=0, **kwargs)
    clf.fit(Xtr, ytr)
    return float(clf.history[-1, "train_loss"])


def run_skorch(net, Xtr, ytr, epochs):
    _, _, cls, kwargs = NETWORKS[net]
    torch.manual_seed(SEED)
    clf = skorch.NeuralNetClassifier(
        cls, module__n_features=64, module__n_outputs=10,
        **{f"module__{k}": v for k, v in kwargs.items()},
        criterion=nn.CrossEntropyLoss, optimizer=torch.optim.Adam, lr=LR, max_epochs=epochs,
        batch_size=BATCH_SIZE, iterator_train__shuffle=True, train_split=None, verbose=0)
    clf.fit(Xtr, ytr)
    return float(clf.history[-1, "train_loss"])


def run_variant(variant, net, data, epochs):
    """Run one variant once; return (seconds, final training loss)."""
    Xtr, ytr, Xt, yt = data
    gc.collect()
    t0 = time.perf_counter()
    if variant == "hand":
        loss = run_hand(net, Xt, yt, epochs, log_loss=True)
    elif variant == "hand_min":
        loss = run_hand(net, Xt, yt, epochs, log_loss=False)
    elif variant == "nnpipe":
        loss = run_nnpipe(net, Xtr, ytr, epochs)
    elif variant == "skorch":
        loss = run_skorch(net, Xtr, ytr, epochs)
    else:  # pragma: no cover
        raise ValueError(variant)
    return time.perf_counter() - t0, loss


# --------------------------------------------------------------------------- reporting


def machine_info(threads):
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        affinity = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
        # the working tree may hold uncommitted nnpipe changes: record that too
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "nnpipe"], cwd=ROOT,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "processor": platform.processor() or platform.machine(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_interop_threads": torch.get_num_interop_threads(),
        "threads_setting": threads,
        "skorch": skorch.__version__,
        "sklearn": sklearn.__version__,
        "numpy": np.__version__,
        "nnpipe": getattr(nnpipe, "__version__", None),
        "git_commit": commit,
        "nnpipe_uncommitted_changes": dirty,
    }


def summarize(times, epochs, n_batches):
    med = {v: statistics.median(ts) for v, ts in times.items()}
    out = {"median_s": med, "min_s": {v: min(ts) for v, ts in times.items()}}
    ratios = {}
    for num in ("nnpipe", "skorch"):
        for den in ("hand", "hand_min"):
            key = f"{num}/{den}"
            per_repeat = [a / b for a, b in zip(times[num], times[den])]
            ratios[key] = {"ratio_of_medians": med[num] / med[den],
                           "median_of_ratios": statistics.median(per_repeat),
                           "per_repeat": per_repeat}
    out["ratios"] = ratios
    steps = epochs * n_batches
    out["per_batch_us"] = {v: 1e6 * med[v] / steps for v in med}
    out["overhead_per_batch_us"] = {
        f"{num}-hand": 1e6 * (med[num] - med["hand"]) / steps for num in ("nnpipe", "skorch")}
    return out


def print_table(results, epochs, n_batches):
    print()
    print(f"fit wall time, median of {results['repeats']} interleaved repeats, {epochs} epochs x "
          f"{n_batches} batches of {BATCH_SIZE}; torch threads = {results['threads']}")
    head = (f"{'network':<8} {'hand-loop s':>11} {'hand(min) s':>11} {'nnpipe s':>9} "
            f"{'skorch s':>9} {'nnpipe/hand':>11} {'skorch/hand':>11} {'nnpipe/min':>10} "
            f"{'ovh us/b':>8}  check")
    print(head)
    print("-" * len(head))
    for net, r in results["networks"].items():
        m, q = r["median_s"], r["ratios"]
        print(f"{net:<8} {m['hand']:>11.3f} {m['hand_min']:>11.3f} {m['nnpipe']:>9.3f} "
              f"{m['skorch']:>9.3f} {q['nnpipe/hand']['ratio_of_medians']:>11.3f} "
              f"{q['skorch/hand']['ratio_of_medians']:>11.3f} "
              f"{q['nnpipe/hand_min']['ratio_of_medians']:>10.3f} "
              f"{r['overhead_per_batch_us']['nnpipe-hand']:>8.0f}  {r['check']}")
    print()
    print("median of per-repeat ratios (robust to load drift):")
    for net, r in results["networks"].items():
        q = r["ratios"]
        print(f"  {net:<6} nnpipe/hand {q['nnpipe/hand']['median_of_ratios']:.3f}   "
              f"nnpipe/hand_min {q['nnpipe/hand_min']['median_of_ratios']:.3f}   "
              f"skorch/hand {q['skorch/hand']['median_of_ratios']:.3f}   "
              f"(per repeat nnpipe/hand: "
              + ", ".join(f"{x:.2f}" for x in q["nnpipe/hand"]["per_repeat"]) + ")")
    print()
    for net, r in results["networks"].items():
        ratio = r["ratios"]["nnpipe/hand"]["median_of_ratios"]
        verdict = "meets" if ratio <= TARGET else "MISSES"
        print(f"  {net:<6} {verdict} the target nnpipe/hand <= {TARGET:.2f} ({ratio:.3f}); "
              f"per batch: hand {r['per_batch_us']['hand']:.0f} us, nnpipe "
              f"{r['per_batch_us']['nnpipe']:.0f} us, skorch {r['per_batch_us']['skorch']:.0f} us")


# --------------------------------------------------------------------------- main


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="interleaved repeats (default 7)")
    parser.add_argument("--epochs", type=int, default=20, help="epochs per fit (default 20)")
    parser.add_argument("--quick", action="store_true", help="2-repeat smoke run")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads for every variant (default 1)")
    parser.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=list(NETWORKS))
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"
                                             / "fit_overhead.json"),
                        help="JSON output path ('' to skip)")
    args = parser.parse_args(argv)
    repeats = 2 if args.quick else args.repeats
    if repeats < 1 or args.epochs < 1:
        parser.error("--repeats and --epochs must be >= 1")

    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set (e.g. imported into a running session)
        pass

    Xtr, ytr = load_data()
    data = (Xtr, ytr, torch.from_numpy(Xtr), torch.from_numpy(ytr))
    n_batches = math.ceil(len(Xtr) / BATCH_SIZE)
    info = machine_info(args.threads)
    print(f"nnpipe fit overhead benchmark: {len(Xtr)} training rows, {n_batches} batches/epoch, "
          f"{args.epochs} epochs, {repeats} repeats, torch {torch.__version__} "
          f"({args.threads} thread(s)), skorch {skorch.__version__}, {os.cpu_count()} CPUs")

    t_start = time.perf_counter()
    # warm-up: every variant once, untimed
    for net in args.networks:
        for variant in VARIANTS:
            run_variant(variant, net, data, max(2, args.epochs // 5))

    times = {net: {v: [] for v in VARIANTS} for net in args.networks}
    losses = {net: {v: [] for v in VARIANTS} for net in args.networks}
    for rep in range(repeats):
        for net in args.networks:
            for variant in VARIANTS:
                seconds, loss = run_variant(variant, net, data, args.epochs)
                times[net][variant].append(seconds)
                losses[net][variant].append(loss)
            print(f"  repeat {rep + 1}/{repeats} {net:<6} "
                  + "  ".join(f"{v} {times[net][v][-1]:.3f}s" for v in VARIANTS), flush=True)

    results = {
        "benchmark": "fit_overhead",
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "machine": info,
        "repeats": repeats,
        "epochs": args.epochs,
        "batch_size": BATCH_SIZE,
        "lr": LR,
        "n_train": len(Xtr),
        "batches_per_epoch": n_batches,
        "threads": args.threads,
        "target_nnpipe_over_hand": TARGET,
        "variants": list(VARIANTS),
        "networks": {},
        "total_wall_s": None,
    }
    for net in args.networks:
        summary = summarize(times[net], args.epochs, n_batches)
        final = {v: losses[net][v][-1] for v in VARIANTS}
        same = math.isclose(final["hand"], final["nnpipe"], rel_tol=1e-5, abs_tol=1e-7)
        summary["final_train_loss"] = final
        summary["check"] = ("same loss as hand" if same else
                            f"LOSS DIFFERS: hand {final['hand']:.6f} nnpipe {final['nnpipe']:.6f}")
        summary["times_s"] = times[net]
        results["networks"][net] = summary
    results["total_wall_s"] = time.perf_counter() - t_start

    print_table(results, args.epochs, n_batches)
    print(f"\ntotal benchmark wall time {results['total_wall_s']:.0f} s")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"results written to {out}")
    return results


if __name__ == "__main__":
    main()
