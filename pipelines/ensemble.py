"""DVC stage ``ensemble``: build, save and log the ensemble declared in params.yaml.

Members use the configuration ``train`` uses (params.yaml plus the search's best parameters,
and with ``pretrain.enabled`` the pretrain stage's encoder as their starting point);
``kind: topk`` takes the best configurations of the search instead (trained from scratch, as
in the search). Logs a parent MLflow run
with a nested run per member. When ``ensemble.enabled`` is false it writes only a note, and
``evaluate`` reports the single model.
"""

from __future__ import annotations

import json
from pathlib import Path

from nnpipe import save
from nnpipe.config import ensemble_kwargs
from nnpipe.data import read_dataset

from ._stage import (add_pretrained_argument, best_config, log_dataset, log_history,
                     pretrained_params, run, tracker_for)


def _args(parser):
    parser.add_argument("--data", required=True, help="the prepare stage's folder")
    parser.add_argument("--best", help="the search stage's best_params.json")
    parser.add_argument("--top", help="the search stage's top_trials.json (kind: topk)")
    add_pretrained_argument(parser)
    parser.add_argument("--out", required=True, help="folder for the saved ensemble")


def _topk_configs(cfg, top_file, task, input_shape):
    """Each top trial's params.yaml overrides, turned into Pipeline.set_params keys."""
    from nnpipe.config import with_overrides

    trials = json.loads(Path(top_file).read_text())
    if not trials:
        raise ValueError("ensemble.kind='topk' but the search has no completed trial "
                         f"({top_file} is empty): run the search first.")
    configs = []
    for trial in trials:
        params = with_overrides(cfg, trial["overrides"]).estimator_params(input_shape)
        configs.append({f"model__{k}": v for k, v in params.items()})
    return configs, [t["number"] for t in trials]


def _body(args, cfg, outputs):
    section = cfg.raw.get("ensemble") or {}
    out = outputs.path(args.out, is_dir=True)
    if not section.get("enabled", False):
        (out / "disabled.json").write_text(json.dumps({"enabled": False}) + "\n")
        print("[ensemble] disabled (ensemble.enabled is false)")
        return
    from nnpipe.ensemble import EnsembleClassifier, EnsembleRegressor

    ds = read_dataset(args.data)
    cfg = best_config(cfg, args.best)
    kwargs = ensemble_kwargs(cfg.raw)
    trial_numbers, reuse = None, {}
    if kwargs.get("kind") == "topk":
        kwargs["configs"], trial_numbers = _topk_configs(cfg, args.top, ds.task, ds.input_shape)
        if cfg.pretrain_enabled:  # the encoder has the best trial's architecture, not theirs
            print("[ensemble] kind: topk members train from scratch, as their search trials did "
                  "(the pretrained encoder has the best configuration's architecture only)")
    else:
        reuse = pretrained_params(cfg, args.pretrained, announce="[ensemble] every member")
    base = cfg.build_pipeline(ds.task, ds.input_shape, on_interrupt="raise", verbose=0, **reuse)
    cls = EnsembleRegressor if ds.task == "regression" else EnsembleClassifier
    with tracker_for(cfg, "ensemble", params={"ensemble": section}) as tracker:
        log_dataset(tracker, cfg, args.data, ds)
        ens = cls(base, **kwargs).fit(ds.X_train, ds.y_train)
        for i, member in enumerate(ens.members_):
            tags = {"seed": ens.member_seeds_[i], "weight": float(ens.weights_[i])}
            if trial_numbers:
                tags["trial"] = trial_numbers[i]
            with tracker.child(f"member-{i}", params=tags) as child:
                log_history(child, member[-1].history)
        save(ens, out)
        tracker.log_metrics({"n_members": len(ens.members_)})
    print(f"[ensemble] {len(ens.members_)} members ({ens.kind}, {ens.combine}); weights "
          f"{[round(float(w), 3) for w in ens.weights_]}")


def main(argv=None):
    run("ensemble", _body, _args, argv)


if __name__ == "__main__":
    main()
