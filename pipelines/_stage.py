"""What every DVC stage shares: arguments, config, tracking, atomic outputs and exit codes.

A stage's ``main()`` is thin: it reads the validated params.yaml, calls the library and writes
exactly the outs that ``dvc.yaml`` declares. Outputs are built in a temporary folder beside the
target and moved into place only when the whole stage succeeded, so an interrupted or failed
stage leaves nothing that DVC (or a person) could take for a finished result. Any failure exits
non-zero: 1 for an error, 130 for Ctrl-C, 143 for SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional

from nnpipe.config import Config, ConfigError, load_config


class Outputs:
    """Stage outputs written into a staging folder, published together at the end."""

    def __init__(self) -> None:
        self._staged: Dict[Path, Path] = {}

    def path(self, target: os.PathLike, is_dir: bool = False) -> Path:
        """Where to write ``target`` now; it appears at ``target`` only if the stage succeeds."""
        target = Path(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        prefix = f".{target.name}.staging-"
        for stale in target.parent.glob(prefix + "*"):  # left by a run that was killed (-9)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
        staged = tmp / target.name
        if is_dir:
            staged.mkdir()
        self._staged[target] = staged
        return staged

    def json(self, target: os.PathLike, data: Any) -> None:
        self.path(target).write_text(json.dumps(data, indent=2, sort_keys=True, default=float))

    def publish(self) -> None:
        for target, staged in self._staged.items():
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
            os.replace(staged, target)
            shutil.rmtree(staged.parent, ignore_errors=True)

    def discard(self) -> None:
        for staged in self._staged.values():
            shutil.rmtree(staged.parent, ignore_errors=True)


class NullTracker:
    """Stands in for :class:`nnpipe.tracking.Tracker` when ``tracking.enabled`` is false."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name == "child":
            return lambda *a, **k: NullTracker()
        if name == "epoch_logger":
            return lambda: None
        return lambda *a, **k: None


def tracker_for(cfg: Config, stage: str, params: Optional[Dict[str, Any]] = None):
    if not cfg.tracking.enabled:
        return NullTracker()
    from nnpipe.tracking import Tracker, flatten

    flat = flatten(params if params is not None else cfg.raw)
    return Tracker(stage, params=flat, experiment=cfg.tracking.experiment or "nnpipe",
                   uri=cfg.tracking.uri)


_EPOCH_METRICS = ("train_loss", "valid_loss", "valid_acc", "lr")


def log_history(tracker, history) -> None:
    """Log a fitted net's per-epoch metrics to ``tracker`` with the epoch as the step."""
    for row in history.to_list():
        tracker.log_metrics({k: float(v) for k, v in row.items() if k in _EPOCH_METRICS},
                            step=int(row["epoch"]))


def best_config(cfg: Config, best_file: Optional[str]) -> Config:
    """``cfg`` with the search's best parameters applied (none when the file holds ``{}``)."""
    if not best_file:
        return cfg
    from nnpipe.config import with_overrides

    best = json.loads(Path(best_file).read_text())
    if best:
        print("[best params] " + ", ".join(f"{k}={v}" for k, v in best.items()))
    return with_overrides(cfg, best)


def add_pretrained_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pretrained", help="the pretrain stage's folder (used when "
                                             "pretrain.enabled)")


def pretrained_params(cfg: Config, folder: Optional[str],
                      announce: Optional[str] = None) -> Dict[str, Any]:
    """With ``pretrain.enabled``, the estimator parameters that start a network from the pretrain
    stage's encoder in ``folder`` (:func:`nnpipe.pretrain.fine_tune_params`, with ``pretrain``'s
    ``freeze`` / ``unfreeze_after`` / ``lr_multiplier``); otherwise ``{}``. ``announce``
    (``"[cv] every fold"``) prints what starts from it."""
    if not cfg.pretrain_enabled:
        return {}
    if not folder:
        raise ValueError("pretrain.enabled is true, but the stage was not given the pretrain "
                         "stage's folder (--pretrained models/pretrained)")
    from nnpipe.pretrain import fine_tune_params

    reuse = fine_tune_params(folder, **cfg.fine_tune_kwargs())
    if announce:
        print(f"{announce} starts from the pretrained encoder {folder} "
              f"({reuse['transfer_layers']})")
    return reuse


def _sigterm(signum, frame):
    raise SystemExit(143)


@contextmanager
def _handled(stage: str) -> Iterator[None]:
    try:
        yield
    except ConfigError as exc:
        print(f"[{stage}] invalid parameters:\n{exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"[{stage}] interrupted: no output was written.", file=sys.stderr)
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as exc:  # noqa: BLE001 - every failure must exit non-zero, with the reason
        traceback.print_exc()
        print(f"[{stage}] failed: {type(exc).__name__}: {exc}\nNo output was written.",
              file=sys.stderr)
        sys.exit(1)


def run(stage: str, body: Callable[[argparse.Namespace, Config, Outputs], None],
        add_arguments: Callable[[argparse.ArgumentParser], None], argv=None) -> None:
    """Parse arguments, load params.yaml, run ``body`` and publish its outputs atomically."""
    parser = argparse.ArgumentParser(prog=f"python -m pipelines.{stage}")
    parser.add_argument("--params", default=os.environ.get("NNPIPE_PARAMS", "params.yaml"),
                        help="the params file (default: params.yaml)")
    add_arguments(parser)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm)
    outputs = Outputs()
    with _handled(stage):
        cfg = load_config(args.params)
        try:
            body(args, cfg, outputs)
        except BaseException:
            outputs.discard()
            raise
        outputs.publish()
        print(f"[{stage}] done.")
