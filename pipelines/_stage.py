"""What every DVC stage shares: arguments, config, tracking, atomic outputs and exit codes.

A stage's ``main()`` is thin: it reads the validated params.yaml, calls the library and writes
exactly the outs that ``dvc.yaml`` declares. Outputs are built in a temporary folder beside the
target and moved into place only when the whole stage succeeded, so an interrupted or failed
stage leaves nothing that DVC (or a person) could take for a finished result. Any failure exits
non-zero: 1 for an error, 130 for Ctrl-C, 143 for SIGTERM.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
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
from nnpipe.exceptions import EXPECTED_ERRORS, debug_requested


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
    """Stands in for :class:`nnpipe.tracking.Tracker` when ``tracking.enabled`` is false: every
    logging call does nothing; ``child`` checks its ``status`` as the real one does."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def child(self, name: str, params: Optional[Dict[str, Any]] = None, *,
              tags: Optional[Dict[str, Any]] = None, status: Optional[str] = None):
        from nnpipe.tracking import check_status

        check_status(status, optional=True)
        return NullTracker()

    def epoch_logger(self, *args: Any, **kwargs: Any) -> None:
        return None

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name.startswith("__"):
            raise AttributeError(name)
        return lambda *a, **k: None


def _default(func: Callable[..., Any], name: str) -> Any:
    """The default of ``func``'s parameter ``name``: defaults live once, in the signatures."""
    return inspect.signature(func).parameters[name].default


def _run_name(cfg: Config, stage: str, data: str) -> str:
    """A short, human run name saying what ran: ``train · cnn2d · digits · lr=0.005``."""
    from nnpipe.cv import cross_validate_model
    from nnpipe.ensemble import EnsembleClassifier
    from nnpipe.estimators import NNClassifier

    module = cfg.model.get("module", _default(NNClassifier, "module"))
    lr = cfg.train.get("lr", _default(NNClassifier, "lr"))
    parts = [stage]
    if stage == "cv":
        folds = cfg.cv.folds or _default(cross_validate_model, "folds")
        repeats = cfg.cv.repeats or 1
        parts.append(f"{folds} folds" + (f"×{repeats}" if repeats > 1 else ""))
    elif stage == "ensemble":
        section = cfg.raw.get("ensemble") or {}
        kind = section.get("kind", _default(EnsembleClassifier, "kind"))
        members = section.get("n_members", _default(EnsembleClassifier, "n_members"))
        parts.append(f"{kind}×{members}")
    elif stage == "search" and cfg.search is not None:
        parts.append(f"{cfg.search.n_trials} trials")
    if stage != "prepare":
        parts.append(str(module))
    parts.append(data)
    if stage in ("train", "cv", "ensemble"):
        parts.append(f"lr={lr:g}" if isinstance(lr, (int, float)) else f"lr={lr}")
    return " · ".join(parts)


def tracker_for(cfg: Config, stage: str, params: Optional[Dict[str, Any]] = None):
    """The stage's MLflow run (a :class:`NullTracker` when ``tracking.enabled`` is false).

    Named by what ran (:func:`_run_name`), tagged with the stage (``nnpipe.stage``) and its
    entry point as the run's source (``mlflow.source.name = pipelines/<stage>.py``, type
    ``JOB``), in ``tracking.experiment`` or, when that is unset, ``nnpipe-<data>``
    (:func:`nnpipe.tracking.default_experiment`).
    """
    if not cfg.tracking.enabled:
        return NullTracker()
    from nnpipe.tracking import Tracker, data_name, default_experiment, flatten

    flat = flatten(params if params is not None else cfg.raw)
    data = data_name(cfg.data.source, cfg.data.path)
    experiment = cfg.tracking.experiment or default_experiment(cfg.data.source, cfg.data.path)
    entry = Path(__file__).with_name(f"{stage}.py")
    source = f"{entry.parent.name}/{entry.name}"
    return Tracker(stage, params=flat, experiment=experiment, uri=cfg.tracking.uri,
                   name=_run_name(cfg, stage, data),
                   tags={"mlflow.source.name": source, "mlflow.source.type": "JOB"})


def log_dataset(tracker, cfg: Config, data_dir: os.PathLike, ds, split: str = "train") -> None:
    """Log the prepared ``split`` (``train`` or ``test``) of ``ds`` (read from ``data_dir``) as
    the run's dataset: named after the data source, ``<data_dir>/<split>.npz`` as its source,
    context ``training`` or ``test``."""
    if split not in ("train", "test"):
        raise ValueError(f"log_dataset: split must be 'train' or 'test', got {split!r}.")
    from nnpipe.tracking import data_name

    tracker.log_dataset(getattr(ds, f"X_{split}"), getattr(ds, f"y_{split}"),
                        name=data_name(cfg.data.source, cfg.data.path),
                        source=Path(data_dir) / f"{split}.npz",
                        context="training" if split == "train" else "test")


def log_history(tracker, history) -> None:
    """Log a fitted net's history to ``tracker``: what changes per epoch as metrics with the
    epoch as the step, a constant ``lr`` once, batch counts not at all
    (:func:`nnpipe.tracking.epoch_metrics`)."""
    from nnpipe.tracking import epoch_metrics

    per_epoch, final = epoch_metrics(history)
    for step, values in per_epoch:
        tracker.log_metrics(values, step=step)
    if final:
        tracker.log_metrics(final, step=per_epoch[-1][0] if per_epoch else None)


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
    """Exit 1 on any error, 130 on Ctrl-C. An expected error (invalid params, a missing file,
    nnpipe's own errors, a ValueError naming a bad value) prints one message; its traceback
    only with ``NNPIPE_DEBUG=1``. Any other exception is a bug and prints its traceback."""
    try:
        yield
    except ConfigError as exc:
        if debug_requested():
            traceback.print_exc()
        print(f"[{stage}] invalid parameters:\n{exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"[{stage}] interrupted: no output was written.", file=sys.stderr)
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as exc:  # noqa: BLE001 - every failure must exit non-zero, with the reason
        expected = isinstance(exc, EXPECTED_ERRORS)
        if not expected or debug_requested():
            traceback.print_exc()
        hint = " (NNPIPE_DEBUG=1 shows the traceback)" if expected and not debug_requested() \
            else ""
        print(f"[{stage}] failed: {type(exc).__name__}: {exc}\nNo output was written.{hint}",
              file=sys.stderr)
        sys.exit(1)


def _prepared_data(args: argparse.Namespace) -> Optional[str]:
    """The stage's ``--data`` folder when the prepare stage has written it: params.yaml is then
    also checked against the data's shape before any work (else ``read_dataset`` says what is
    missing)."""
    folder = getattr(args, "data", None)
    if folder and all(Path(folder, name).is_file() for name in ("meta.json", "train.npz")):
        return folder
    return None


@contextmanager
def log_to_console(level: int = logging.INFO) -> Iterator[None]:
    """Show the library's progress lines (the ``nnpipe`` logger) on stdout while the block runs.

    The library only logs (module loggers under ``nnpipe``, no handlers); a stage decides where
    the lines go: :func:`run` does this for every stage, and puts the logger back as it was
    afterwards (a stage's ``main`` called from Python leaves no handler behind).
    """
    root = logging.getLogger("nnpipe")
    level_before = root.level
    handler = None
    if not any(isinstance(h, _Stdout) for h in root.handlers):
        handler = _Stdout()
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
    root.setLevel(level)
    try:
        yield
    finally:
        if handler is not None:
            root.removeHandler(handler)
        root.setLevel(level_before)


class _Stdout(logging.StreamHandler):
    """A handler writing to whatever ``sys.stdout`` is when a record comes (it may be replaced
    after the handler was made, e.g. by a test's output capture)."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        pass


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
    with log_to_console(), _handled(stage):
        cfg = load_config(args.params, data=_prepared_data(args))
        try:
            body(args, cfg, outputs)
        except BaseException:
            outputs.discard()
            raise
        outputs.publish()
        print(f"[{stage}] done.")
