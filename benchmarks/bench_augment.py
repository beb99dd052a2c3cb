"""Augmentation overhead: ``fit`` of the default 2-D CNN on digits with and without augmentation.

Run from the repository root::

    python benchmarks/bench_augment.py            # 7 interleaved repeats x 20 epochs
    python benchmarks/bench_augment.py --quick    # 2 repeats

Target: fit with augmentation <= 1.25x fit without, same epochs, measured side by side.
The augmentation is the pipeline's default for digits (``params.yaml``): random shift of up to
10% and rotation of up to 10 degrees, each with probability 0.5 (fused into one kornia warp),
plus Gaussian noise (std 0.02). Both fits use the same seed, data (75% stratified split of
digits, seed 0), batch size 64, Adam 1e-3, 20% validation split, one torch thread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from nnpipe import NNClassifier

AUGMENT = {"shift": {"max_fraction": 0.1, "p": 0.5}, "rotation": {"degrees": 10, "p": 0.5},
           "noise": {"std": 0.02}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    repeats = 2 if args.quick else args.repeats
    torch.set_num_threads(1)
    X, y = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split((X / 16).astype(np.float32), y, test_size=0.25,
                                          stratify=y, random_state=0)

    def fit(augment):
        clf = NNClassifier("cnn2d", input_shape=(1, 8, 8), max_epochs=args.epochs,
                           augment=augment, random_state=0)
        start = time.perf_counter()
        clf.fit(Xtr, ytr)
        return time.perf_counter() - start, clf.score(Xte, yte)

    fit(None), fit(AUGMENT)  # warm-up
    times = {"plain": [], "augmented": []}
    acc = {}
    for _ in range(repeats):
        for name, aug in (("plain", None), ("augmented", AUGMENT)):
            seconds, acc[name] = fit(aug)
            times[name].append(seconds)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = [a / p for a, p in zip(times["augmented"], times["plain"])]
    print(f"2-D CNN on digits, {args.epochs} epochs, median of {repeats} interleaved repeats, "
          "1 torch thread")
    print(f"{'variant':10s} {'fit s':>8s} {'test acc':>9s}")
    for name in times:
        print(f"{name:10s} {med[name]:8.3f} {acc[name]:9.4f}")
    print(f"augmented / plain: ratio of medians {med['augmented'] / med['plain']:.3f}, "
          f"median of per-repeat ratios {statistics.median(ratios):.3f} (target <= 1.25)")
    out = Path(__file__).parent / "results" / "augment_overhead.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"times": times, "accuracy": acc, "augment": AUGMENT,
                               "torch": torch.__version__}, indent=1))


if __name__ == "__main__":
    main()
