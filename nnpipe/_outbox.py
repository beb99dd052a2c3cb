"""Replaying an offline tracker's outbox file (``<outbox>/<run-uuid>.jsonl``) into a tracking
store: the machinery behind :func:`nnpipe.tracking.sync_outbox`."""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

from ._mlflow import (TrackingWarning, _experiment_id, _is_rejection, _log_batch, _log_dataset,
                      _log_pyfunc, _short, _uploading)

try:  # advisory locks keep `sync` away from an outbox file a live stage is still writing
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

#: the outbox record format this nnpipe writes and reads
_OUTBOX_FORMAT = 1


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[Optional[Any]]:
    """Open ``path`` with an exclusive lock; yields None when a live stage still holds it."""
    with open(path, "r", encoding="utf-8") as fh:
        if fcntl is not None:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                yield None
                return
        yield fh


def _read_records(path: Path, fh) -> List[Dict[str, Any]]:
    records = []
    for number, line in enumerate(fh, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            warnings.warn(f"{path}:{number} is not valid JSON (a stage stopped mid-write?); "
                          "skipping that line.", TrackingWarning, stacklevel=3)
            continue
        if not isinstance(record, dict) or "type" not in record or "run" not in record:
            raise ValueError(f"{path}:{number} is not an nnpipe outbox record: {line[:200]!r}")
        if record.get("v", 1) > _OUTBOX_FORMAT:
            raise ValueError(f"{path}:{number} was written by a newer nnpipe (outbox format "
                             f"{record['v']} > {_OUTBOX_FORMAT}); upgrade nnpipe to sync it.")
        records.append(record)
    return records


class _Replay:
    """Replays one outbox file into a tracking store."""

    def __init__(self, client, uri: str, path: Path, timeout_is_ours: bool):
        self.client, self.uri, self.path = client, uri, path
        self.timeout_is_ours = timeout_is_ours
        self.runs: Dict[str, str] = {}  # outbox key -> run id
        self.experiments: Dict[str, str] = {}  # run id -> experiment id
        self.params: Dict[str, Dict[str, Any]] = {}
        self.ended: set = set()

    def _soft(self, what: str, fn) -> None:
        """Run ``fn``; a rejection (e.g. a param already set to another value) only warns."""
        try:
            fn()
        except Exception as exc:
            if not _is_rejection(exc):
                raise
            warnings.warn(f"{self.path}: MLflow rejected {what} ({_short(exc)}); skipped.",
                          TrackingWarning, stacklevel=4)

    def _existing(self, run_id: Optional[str]):
        if not run_id:
            return None
        try:
            run = self.client.get_run(run_id)
        except Exception as exc:
            if getattr(exc, "error_code", None) == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise
        return run if run.info.lifecycle_stage == "active" else None

    def run(self, rec: Dict[str, Any]) -> None:
        key = rec["run"]
        tags = {str(k): str(v) for k, v in (rec.get("tags") or {}).items()}
        run = self._existing(rec.get("mlflow_run_id"))
        if run is None:
            exp_id = _experiment_id(self.client, self.uri, rec.get("experiment") or "nnpipe")
            found = self.client.search_runs([exp_id], f"tags.`nnpipe.outbox_key` = '{key}'",
                                            max_results=1)
            if found:
                run = found[0]
            else:
                if rec.get("parent"):
                    tags["mlflow.parentRunId"] = self._run_id(rec["parent"])
                tags["nnpipe.outbox_key"] = key
                run = self.client.create_run(exp_id, start_time=rec.get("start_time"), tags=tags,
                                             run_name=rec.get("name"))
        run_id = run.info.run_id
        self.runs[key] = run_id
        self.experiments[run_id] = run.info.experiment_id
        self.params[key] = dict(rec.get("params") or {})
        self._soft("params",
                   lambda: _log_batch(self.client, run_id, params=rec.get("params") or {}))
        self._soft("tags", lambda: _log_batch(self.client, run_id, tags=tags))

    def _has_model(self, run_id: str, name: str) -> bool:
        found = self.client.search_logged_models([self.experiments[run_id]],
                                                 filter_string=f"source_run_id = '{run_id}'")
        return any(m.name == name and str(m.status) == "READY" for m in found)

    def _run_id(self, key: str) -> str:
        if key not in self.runs:
            raise ValueError(f"{self.path}: a record refers to run {key!r} before its 'run' "
                             "record; the file is damaged.")
        return self.runs[key]

    def apply(self, rec: Dict[str, Any]) -> None:
        kind = rec["type"]
        if kind == "run":
            return self.run(rec)
        run_id = self._run_id(rec["run"])
        if kind == "params":
            self.params[rec["run"]].update(rec["params"])
            self._soft("params", lambda: _log_batch(self.client, run_id, params=rec["params"]))
        elif kind == "metrics":
            self._soft("metrics", lambda: _log_batch(
                self.client, run_id, metrics=rec["metrics"], step=rec.get("step") or 0,
                timestamp=rec.get("timestamp")))
        elif kind == "tags":
            self._soft("tags", lambda: _log_batch(self.client, run_id, tags=rec["tags"]))
        elif kind == "artifact":
            path = Path(rec["path"])
            if not path.exists():
                warnings.warn(f"{self.path}: artifact {path} no longer exists; skipped.",
                              TrackingWarning, stacklevel=3)
                return
            with _uploading(self.timeout_is_ours):
                if rec.get("dir"):
                    self.client.log_artifacts(run_id, str(path), rec.get("artifact_path"))
                else:
                    self.client.log_artifact(run_id, str(path), rec.get("artifact_path"))
        elif kind == "model":
            path = Path(rec["path"])
            if not path.is_dir():
                warnings.warn(f"{self.path}: model directory {path} no longer exists; skipped.",
                              TrackingWarning, stacklevel=3)
                return
            name = rec.get("name") or "model"
            if self._has_model(run_id, name):  # an earlier sync was stopped after logging it
                return
            _log_pyfunc(self.client, self.uri, run_id, self.experiments[run_id], path, name,
                        self.params[rec["run"]], rec.get("kwargs") or {}, self.timeout_is_ours,
                        rec.get("extras"))
        elif kind == "dataset":  # MLflow keeps one input per (run, dataset): replays add nothing
            _log_dataset(self.client, run_id, rec["dataset"], rec.get("context") or "training")
        elif kind == "end":
            self.client.set_terminated(run_id, rec.get("status", "FINISHED"), rec.get("end_time"))
            self.ended.add(rec["run"])
        else:
            raise ValueError(f"{self.path}: unknown outbox record type {kind!r}.")

    def finish(self) -> None:
        """Runs with no ``end`` record belong to a stage that died: mark them FAILED."""
        for key, run_id in self.runs.items():
            if key not in self.ended:
                _log_batch(self.client, run_id, tags={
                    "nnpipe.outbox_note": "the stage stopped without ending this run"})
                self.client.set_terminated(run_id, "FAILED")
