"""What ensembles buy on digits, and what they cost.

Run from the repository root::

    python benchmarks/bench_ensemble.py            # ~10 minutes on 2 cores
    python benchmarks/bench_ensemble.py --quick

Prints, in one run:

1. a 5-member ``seeds`` ensemble of the default network (params.yaml's model / train / augment)
   against its members: test NLL of the ensemble vs the mean member NLL, accuracy vs the mean
   member accuracy (digits, 25% stratified test split, seed 0);
2. the cost of a 5-member ``snapshot`` ensemble against one plain run of the same epochs
   (target <= 1.15x), median of interleaved repeats;
3. parallel training of 4 members with ``n_jobs=2`` against ``n_jobs=1`` (target >= 1.6x);
4. temperature scaling on held-out data: test ECE without and with it (15 bins).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch

warnings.filterwarnings("ignore")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    repeats = 1 if args.quick else args.repeats

    from nnpipe import NNClassifier
    from nnpipe.config import load_config
    from nnpipe.data import load_dataset
    from nnpipe.ensemble import EnsembleClassifier
    from nnpipe.metrics import ece, nll

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "params.yaml")
    ds = load_dataset("digits")
    Xtr, ytr, Xte, yte = ds.X_train, ds.y_train, ds.X_test, ds.y_test
    base = cfg.build_estimator(ds.task, ds.input_shape, verbose=0)
    if args.quick:
        base.set_params(max_epochs=5)
    results = {}

    # 1. seeds ensemble vs its members
    ens = EnsembleClassifier(base, kind="seeds", n_members=5, n_jobs=2).fit(Xtr, ytr)
    P = ens.member_outputs(Xte)
    member_nll = [nll(yte, p) for p in P]
    member_acc = [float((p.argmax(1) == yte).mean()) for p in P]
    proba = ens.predict_proba(Xte)
    results["seeds"] = {"ensemble_nll": nll(yte, proba), "mean_member_nll": float(np.mean(member_nll)),
                        "ensemble_acc": float((proba.argmax(1) == yte).mean()),
                        "mean_member_acc": float(np.mean(member_acc)), "member_acc": member_acc}
    r = results["seeds"]
    print(f"1. seeds x5: test NLL ensemble {r['ensemble_nll']:.4f} vs mean member "
          f"{r['mean_member_nll']:.4f}; accuracy ensemble {r['ensemble_acc']:.4f} vs mean member "
          f"{r['mean_member_acc']:.4f} (members {[round(a, 4) for a in member_acc]})")

    # 2. snapshot ensemble vs one run of the same epochs (one torch thread each)
    torch.set_num_threads(1)
    single, snap = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        NNClassifier(**base.get_params(deep=False)).set_params(lr_schedule="cosine").fit(Xtr, ytr)
        single.append(time.perf_counter() - t)
        t = time.perf_counter()
        s = EnsembleClassifier(base, kind="snapshot", n_members=5).fit(Xtr, ytr)
        snap.append(time.perf_counter() - t)
    ratio = statistics.median(snap) / statistics.median(single)
    results["snapshot"] = {"single_s": single, "snapshot_s": snap, "ratio": ratio,
                           "snapshot_acc": float(s.score(Xte, yte))}
    print(f"2. snapshot x5: {statistics.median(snap):.2f} s vs one run {statistics.median(single):.2f}"
          f" s -> {ratio:.3f}x (target <= 1.15); snapshot ensemble accuracy "
          f"{results['snapshot']['snapshot_acc']:.4f}")

    # 3. 4 members, n_jobs=2 vs n_jobs=1 (after a warm-up that starts joblib's worker processes,
    # which joblib then reuses, as it does for every later ensemble in a session)
    EnsembleClassifier(base.set_params(max_epochs=1), n_members=2, n_jobs=2).fit(Xtr, ytr)
    base.set_params(max_epochs=5 if args.quick else cfg.train.get("max_epochs", 40))
    seq, par = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        EnsembleClassifier(base, n_members=4, n_jobs=1).fit(Xtr, ytr)
        seq.append(time.perf_counter() - t)
        t = time.perf_counter()
        EnsembleClassifier(base, n_members=4, n_jobs=2).fit(Xtr, ytr)
        par.append(time.perf_counter() - t)
    speedup = statistics.median(seq) / statistics.median(par)
    results["parallel"] = {"n_jobs1_s": seq, "n_jobs2_s": par, "speedup": speedup}
    print(f"3. 4 members: n_jobs=1 {statistics.median(seq):.2f} s, n_jobs=2 "
          f"{statistics.median(par):.2f} s -> {speedup:.2f}x (target >= 1.6)")

    # 4. temperature scaling on a validation split, judged on the test set. The CNN above is
    # near-perfect on digits (nothing to calibrate); an MLP trained far past its optimum is
    # overconfident, the case temperature scaling exists for.
    hot = NNClassifier(module__hidden_sizes=[128, 128], max_epochs=5 if args.quick else 150,
                       lr=1e-2, train_split=None, verbose=0)
    plain = EnsembleClassifier(hot, n_members=3, n_jobs=2, validation_fraction=0.2,
                               random_state=1).fit(Xtr, ytr)
    scaled = EnsembleClassifier(hot, n_members=3, n_jobs=2, validation_fraction=0.2,
                                temperature=True, random_state=1).fit(Xtr, ytr)
    e0, e1 = ece(yte, plain.predict_proba(Xte)), ece(yte, scaled.predict_proba(Xte))
    results["temperature"] = {"T": scaled.temperature_, "ece_before": e0, "ece_after": e1,
                              "nll_before": nll(yte, plain.predict_proba(Xte)),
                              "nll_after": nll(yte, scaled.predict_proba(Xte))}
    print(f"4. temperature scaling (overfit MLP x3): T={scaled.temperature_:.3f}, test ECE "
          f"{e0:.4f} -> {e1:.4f}, NLL {results['temperature']['nll_before']:.4f} -> "
          f"{results['temperature']['nll_after']:.4f}")
    out = root / "benchmarks" / "results" / "ensemble.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=float))


if __name__ == "__main__":
    main()
