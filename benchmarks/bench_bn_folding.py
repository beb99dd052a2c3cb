"""Predict latency before and after ``nnpipe.export.fold_batchnorm``.

Run from the repository root::

    python benchmarks/bench_bn_folding.py            # 15 repeats (~1-2 min on 2 cores)
    python benchmarks/bench_bn_folding.py --quick    # 3 repeats, smoke run

What is compared
----------------
Data: scikit-learn ``load_digits`` (1797 x 64), ``X / 16`` as float32, a 25 % stratified test
split with ``random_state=0``; the networks train on the 75 % for ``--epochs`` epochs (default 3;
only so that the batch-norm running statistics and weights are real ones, accuracy is not the
point) and are timed on rows of the test split.

Networks (the ``model`` section of ``params.yaml``, and an MLP with the same knobs):

* ``cnn2d`` - ``NNClassifier("cnn2d", input_shape=(1, 8, 8), module__channels=[32, 64],
  module__hidden_sizes=[128], activation="relu", batch_norm=True, dropout=0.1)``
* ``mlp``   - ``NNClassifier("mlp", batch_norm=True, dropout=0.1)`` (hidden sizes 256-128)

``--batch-norm after`` places batch norm after the activation instead (then the CNN keeps its
first batch norm, which feeds a zero-padded convolution and cannot be folded).

Variants: ``unfolded`` (the fitted estimator) and ``folded`` (``fold_batchnorm(estimator)``), each
timed at two levels:

* ``module``  - ``net.module_(x)`` under ``torch.inference_mode()`` in eval mode, ``x`` a float32
  tensor made before the timer starts: the network alone, where folding acts.
* ``predict`` - ``net.predict_proba(X)`` on a numpy array: what a user pays, with sklearn's input
  validation and skorch's batching around the same forward pass.

What is timed
-------------
Per (network, level, batch size) one timed block is ``k`` back-to-back calls (``k`` chosen so a
block lasts ~20-50 ms), wall time by ``time.perf_counter``; its time per call divided by the batch
size is the per-sample latency. Blocks of the two variants alternate (unfolded, folded, unfolded,
...) ``--repeats`` times after an untimed warm-up, and the medians over the repeats are reported
with their ratio ``folded / unfolded`` (below 1: folding is faster) and the median of the
per-repeat ratios (robust to slow drifts of a shared machine's load). ``gc`` is collected before
every block. Batch sizes: 1 and 256 (``--batch-sizes``). Threads: ``torch.set_num_threads(1)``
by default (``--threads``), as in the other benchmarks. The script also checks the two variants'
predictions agree (max absolute difference of ``predict_proba`` over the test split). Results go
to ``benchmarks/results/bn_folding.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

import nnpipe  # noqa: E402
from nnpipe import NNClassifier  # noqa: E402
from nnpipe.export import FoldingWarning, fold_batchnorm  # noqa: E402

SEED = 0
NETWORKS = {
    "cnn2d": ("cnn2d", {"input_shape": (1, 8, 8), "module__channels": [32, 64],
                        "module__hidden_sizes": [128]}),
    "mlp": ("mlp", {}),
}
LEVELS = ("module", "predict")
VARIANTS = ("unfolded", "folded")


def load_data():
    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    return train_test_split(X, y, test_size=0.25, stratify=y, random_state=SEED)


def fit(net, batch_norm, epochs, Xtr, ytr):
    module, kwargs = NETWORKS[net]
    return NNClassifier(module, activation="relu", batch_norm=batch_norm, dropout=0.1,
                        max_epochs=epochs, lr=0.005, random_state=SEED, **kwargs).fit(Xtr, ytr)


def caller(est, level, X):
    if level == "module":
        x = torch.from_numpy(X)
        module = est.module_.eval()

        def call():
            with torch.inference_mode():
                module(x)
        return call
    return lambda: est.predict_proba(X)


def block(call, k):
    gc.collect()
    t0 = time.perf_counter()
    for _ in range(k):
        call()
    return (time.perf_counter() - t0) / k


def calibrate(call, target=0.03):
    """Number of calls that makes a block last about ``target`` seconds."""
    k = 1
    while True:
        t = block(call, k) * k
        if t >= target / 2 or k >= 100_000:
            return max(1, int(k * target / max(t, 1e-9)))
        k *= 4


def n_layers(est):
    return sum(1 for m in est.module_.modules() if not list(m.children())
               and not isinstance(m, torch.nn.Identity))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="3 repeats, smoke run")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 256])
    parser.add_argument("--batch-norm", default="before", choices=["before", "after"])
    parser.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=list(NETWORKS))
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"
                                             / "bn_folding.json"), help="JSON path ('' to skip)")
    args = parser.parse_args(argv)
    repeats = 3 if args.quick else args.repeats
    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    Xtr, Xte, ytr, _ = load_data()
    print(f"batch-norm folding benchmark: torch {torch.__version__} ({args.threads} thread(s)), "
          f"{os.cpu_count()} CPUs, {repeats} repeats, batch_norm={args.batch_norm!r}")
    t_start = time.perf_counter()
    results = {"benchmark": "bn_folding",
               "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                           "python": platform.python_version(), "torch": torch.__version__,
                           "threads": args.threads, "nnpipe": nnpipe.__version__},
               "repeats": repeats, "epochs": args.epochs, "batch_norm": args.batch_norm,
               "networks": {}}
    for net in args.networks:
        est = fit(net, args.batch_norm, args.epochs, Xtr, ytr)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", FoldingWarning)
            folded = fold_batchnorm(est)
        variants = {"unfolded": est, "folded": folded}
        diff = float(np.abs(folded.predict_proba(Xte) - est.predict_proba(Xte)).max())
        entry = {"max_abs_proba_diff": diff,
                 "layers": {v: n_layers(e) for v, e in variants.items()},
                 "warnings": [str(w.message) for w in caught], "timings": {}}
        for level in LEVELS:
            for bs in args.batch_sizes:
                X = np.ascontiguousarray(Xte[:bs])
                calls = {v: caller(e, level, X) for v, e in variants.items()}
                k = calibrate(calls["unfolded"])
                for call in calls.values():  # warm-up
                    block(call, k)
                times = {v: [] for v in VARIANTS}
                for _ in range(repeats):
                    for v in VARIANTS:
                        times[v].append(block(calls[v], k))
                med = {v: statistics.median(ts) for v, ts in times.items()}
                per_repeat = [f / u for f, u in zip(times["folded"], times["unfolded"])]
                entry["timings"][f"{level}/bs{bs}"] = {
                    "calls_per_block": k,
                    "median_us_per_sample": {v: 1e6 * med[v] / bs for v in VARIANTS},
                    "ratio_of_medians": med["folded"] / med["unfolded"],
                    "median_of_ratios": statistics.median(per_repeat),
                    "per_call_s": times}
        results["networks"][net] = entry
        print(f"  {net}: {entry['layers']['unfolded']} -> {entry['layers']['folded']} layers, "
              f"max |proba diff| {diff:.1e}" + "".join(f"; {w}" for w in entry["warnings"]),
              flush=True)
    results["total_wall_s"] = time.perf_counter() - t_start

    print()
    print("per-sample predict latency, median over repeats (us/sample); ratio = folded / unfolded")
    head = (f"{'network':<8} {'level':<8} {'batch':>5} {'unfolded':>10} {'folded':>10} "
            f"{'ratio':>6} {'med.ratio':>9}")
    print(head)
    print("-" * len(head))
    for net, entry in results["networks"].items():
        for key, t in entry["timings"].items():
            level, bs = key.split("/bs")
            m = t["median_us_per_sample"]
            print(f"{net:<8} {level:<8} {bs:>5} {m['unfolded']:>10.2f} {m['folded']:>10.2f} "
                  f"{t['ratio_of_medians']:>6.3f} {t['median_of_ratios']:>9.3f}")
    print(f"\ntotal benchmark wall time {results['total_wall_s']:.0f} s")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"results written to {out}")
    return results


if __name__ == "__main__":
    main()
