"""Parallel search: wall time of the same Optuna search with ``n_jobs=1`` and ``n_jobs=2``.

Run from the repository root::

    python benchmarks/bench_search_parallel.py            # 3 interleaved repeats (~4 min, 2 cores)
    python benchmarks/bench_search_parallel.py --quick    # smoke run: 1 repeat, 4 short trials
                                                          # (start-up dominates: no speedup)

Target: ``n_jobs=2`` finishes the same number of trials >= 1.6x faster than ``n_jobs=1`` on a
2-core machine.

What is compared
----------------
Data: the 75 % stratified training split of digits (``X / 16`` float32, seed 0), 3-fold CV.

The search (``nnpipe.search.run_search``): a fixed budget of ``--trials`` trials (default 8),
``pruner: none`` (every trial trains all folds in full, so each costs about the same), TPE seeded
with 0, an MLP with hidden layers ``--hidden`` (default 256 128) trained ``--epochs`` epochs per
fold (default 60) without validation split or early stopping, so that one trial takes about 6 s
(3 x 60 epochs; the whole ``n_jobs=1`` search about 45 s). Spawning the workers costs a few
seconds (each imports torch, sklearn, skorch, optuna and nnpipe: ~3 s), which a shorter search
would not amortise. The space (lr 1e-4..1e-2 log, dropout 0..0.5, optimizer adam | rmsprop |
nadam) has no region that diverges, so no trial fails and both runs do the same work: the table
shows the trials finished and the epochs trained by each.

* ``n_jobs=1``: ``run_search`` runs the trials in this process, with ``torch.set_num_threads(1)``.
* ``n_jobs=2``: ``run_search`` runs one worker in this process and spawns one more, sharing the
  study through its Optuna journal file, each with ``cpu_count() // 2`` torch threads (1 here) and
  sampler seed ``random_state + worker``; a file lock makes them stop at exactly ``n_trials``. The
  time includes what a user pays for it: spawning the extra worker and importing torch / nnpipe
  in it (the in-process worker starts at once and hides most of that).

Each repeat times both, interleaved (1, 2, 1, 2, ...), after one untimed warm-up of each; the
script prints the medians, the speedup ``median(n_jobs=1) / median(n_jobs=2)`` and the median of
the per-repeat speedups. ``sum trial s`` is the sum of the trials' own durations (Optuna's
start/complete times): for ``n_jobs=2`` about twice the wall time when the two workers are kept
busy; the gap to the wall time is ``startup s`` (from the call to the first trial's start:
validating the space, creating the study, spawning the workers and their imports) plus the idle
tail (``teardown s``: from the last trial's end to the return, including a worker idle while the
other finishes its last trial, and shutting the pool down). The 1-minute load average before and
after is printed: other work on the machine skews the result.
``--serial-threads 2`` adds a row for ``n_jobs=1`` with 2 torch threads (intra-op parallelism
instead of trial parallelism), for context.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _search_common import digits_train, quiet, trial_epochs  # noqa: E402

from nnpipe.search import run_search  # noqa: E402

SPACE = {"train.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
         "model.dropout": {"type": "float", "low": 0.0, "high": 0.5},
         "train.optimizer": {"type": "categorical", "choices": ["adam", "rmsprop", "nadam"]}}


def params(n_jobs: int, n_trials: int, epochs: int, hidden) -> dict:
    return {
        "model": {"module": "mlp", "module__hidden_sizes": list(hidden)},
        "train": {"max_epochs": epochs, "random_state": 0, "verbose": 0, "train_split": None},
        "search": {"enabled": True, "n_trials": n_trials, "n_jobs": n_jobs, "sampler": "tpe",
                   "pruner": "none", "metric": "accuracy", "folds": 3, "random_state": 0,
                   "space": SPACE},
    }


def timed_search(n_jobs: int, threads: int, args, X, y) -> dict:
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        raw = params(n_jobs, args.trials, args.epochs, args.hidden)
        start, wall_start = time.perf_counter(), time.time()
        with quiet(not args.verbose):
            study = run_search(raw, X, y, "classification",
                               journal=os.path.join(tmp, "search.journal"))
        seconds, wall_end = time.perf_counter() - start, time.time()
        trials = study.get_trials(deepcopy=False)
    torch.set_num_threads(1)
    states = [t.state.name for t in trials]
    durations = [(t.datetime_complete - t.datetime_start).total_seconds() for t in trials
                 if t.datetime_complete and t.datetime_start]
    starts = [t.datetime_start.timestamp() for t in trials if t.datetime_start]
    ends = [t.datetime_complete.timestamp() for t in trials if t.datetime_complete]
    return {"seconds": seconds,
            "startup": min(starts) - wall_start if starts else float("nan"),
            "teardown": wall_end - max(ends) if ends else float("nan"),
            "finished": states.count("COMPLETE") + states.count("PRUNED"),
            "failed": states.count("FAIL"), "trials": len(trials),
            "epochs": sum(trial_epochs(t) for t in trials), "trial_seconds": sum(durations),
            "best": max((t.value for t in trials if t.state.name == "COMPLETE"),
                        default=float("nan"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=60, help="max_epochs per fold")
    parser.add_argument("--hidden", type=int, nargs="+", default=[256, 128])
    parser.add_argument("--serial-threads", type=int, choices=[1, 2], default=1,
                        help="2: also time n_jobs=1 with 2 torch threads")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--verbose", action="store_true", help="show run_search's trial lines")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.trials, args.epochs = 1, 4, 5
    torch.set_num_threads(1)
    X, y = digits_train()
    load_before = os.getloadavg()[0]
    variants = [("n_jobs=1", 1, 1), ("n_jobs=2", 2, 1)]
    if args.serial_threads == 2:
        variants.append(("n_jobs=1 2thr", 1, 2))

    for _, n_jobs, threads in variants:  # warm-up: imports, allocator, page cache
        timed_search(n_jobs, threads, argparse.Namespace(**{**vars(args), "trials": 1,
                                                             "epochs": 2}), X, y)
    runs = {name: [] for name, _, _ in variants}
    for r in range(args.repeats):
        for name, n_jobs, threads in variants:
            runs[name].append(timed_search(n_jobs, threads, args, X, y))
            print(f"repeat {r}: {name:13s} {runs[name][-1]['seconds']:7.2f} s", flush=True)

    med = {name: statistics.median(x["seconds"] for x in rs) for name, rs in runs.items()}
    speedups = [a["seconds"] / b["seconds"] for a, b in zip(runs["n_jobs=1"], runs["n_jobs=2"])]
    print()
    print(f"search of {args.trials} trials (MLP {args.hidden}, 3 folds x {args.epochs} epochs, "
          f"pruner none), median of {args.repeats} interleaved repeats, {os.cpu_count()} CPUs, "
          f"load average before / after {load_before:.2f} / {os.getloadavg()[0]:.2f}")
    print(f"{'variant':13s} {'wall s':>8s} {'sum trial s':>11s} {'startup s':>9s} "
          f"{'teardown s':>10s} {'finished':>8s} {'failed':>6s} {'epochs':>7s} {'best':>7s}")
    for name, rs in runs.items():
        last = rs[-1]

        def m(key):
            return statistics.median(x[key] for x in rs)

        print(f"{name:13s} {med[name]:8.2f} {m('trial_seconds'):11.2f} {m('startup'):9.2f} "
              f"{m('teardown'):10.2f} "
              f"{last['finished']:8d} {last['failed']:6d} {last['epochs']:7d} {last['best']:7.4f}")
    same = len({x["finished"] for rs in runs.values() for x in rs}) == 1
    print(f"same number of finished trials in every run: {'yes' if same else 'NO'}")
    speedup = med["n_jobs=1"] / med["n_jobs=2"]
    print(f"speedup n_jobs=2 vs n_jobs=1: ratio of medians {speedup:.2f}x, median of per-repeat "
          f"speedups {statistics.median(speedups):.2f}x (target >= 1.6x: "
          f"{'met' if speedup >= 1.6 and same else 'NOT met'})")
    name = "search_parallel_quick.json" if args.quick else "search_parallel.json"
    out = Path(__file__).parent / "results" / name
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "runs": runs, "medians": med,
                               "speedup": speedup, "per_repeat_speedups": speedups,
                               "cpu_count": os.cpu_count(), "torch": torch.__version__},
                              indent=1))


if __name__ == "__main__":
    main()
