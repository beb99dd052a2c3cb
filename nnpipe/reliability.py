"""Guards against crashes: torn Optuna journals and trials orphaned by killed search workers.

An append cut short by a crash leaves a journal whose last line is incomplete; Optuna would then
fail on a later open with a ``JSONDecodeError``, or append after the torn bytes. nnpipe checks the
journal before opening it: a torn last line is cut off (the intact part is kept byte for byte,
the torn bytes are saved beside it as ``<journal>.torn``) and the user is warned.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import List, Optional, Tuple

__all__ = ["check_journal", "JournalRepairWarning",
           "WorkerLease", "fail_orphaned_trials"]

logger = logging.getLogger(__name__)


class JournalRepairWarning(UserWarning):
    """A torn journal was repaired."""


def check_journal(path: os.PathLike) -> bool:
    """Repair a journal whose last line was cut mid-write; return True if it was repaired.

    Raises ``ValueError`` when a line *before* the last one is not valid JSON: that is not a torn
    append but a damaged file, and nnpipe refuses to guess.
    """
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return False
    data = path.read_bytes()
    lines = data.split(b"\n")
    complete, tail = lines[:-1], lines[-1]  # tail is b"" when the file ends with a newline
    for number, line in enumerate(complete, 1):
        if not line.strip():
            continue
        try:
            json.loads(line)
        except ValueError:
            if number == len(complete) and not tail:
                # the last full line is garbage: a torn write followed by a newline
                tail, complete = line + b"\n", complete[:-1]
                break
            raise ValueError(f"{path}: line {number} is not valid JSON; the journal is damaged "
                             "beyond a torn last write. Restore it from a backup or start a new "
                             "study (search.study_name / a new journal file).") from None
    if not tail:
        return False
    keep = b"".join(line + b"\n" for line in complete)
    Path(f"{path}.torn").write_bytes(tail)
    tmp = path.with_name(f".{path.name}.repair")
    tmp.write_bytes(keep)
    os.replace(tmp, path)
    warnings.warn(f"{path}: the last journal entry was cut mid-write (a crash during append); "
                  f"removed its {len(tail)} bytes (kept in {path}.torn). Completed trials are "
                  "intact.", JournalRepairWarning, stacklevel=2)
    return True


# --------------------------------------------------------------------------- worker leases


def _journal_file(url: Optional[str], journal: os.PathLike) -> str:
    return url[len("journal:"):] if url and url.startswith("journal:") else os.fspath(journal)


_LEASE_CLASS = 0x6E6E7070  # "nnpp": the first key of nnpipe's two-key PostgreSQL advisory locks


class WorkerLease:
    """A search worker's proof of life, which the operating system or the database server takes
    away the moment the worker's process dies (``kill -9`` included).

    Optuna's journal storage has no heartbeat, so a trial whose worker was killed would stay
    RUNNING forever. Each nnpipe worker holds a lease for its lifetime and tags every trial it
    runs with the lease's id; any worker can then tell a live trial from an orphan without
    waiting for a timeout:

    - journal (and SQLite) storage: an exclusive ``flock`` on ``<journal>.workers/<id>.lock``,
      released by the kernel when the process ends; one host, or a shared file system with
      working locks;
    - PostgreSQL: a session-level advisory lock, released by the server when the worker's
      connection drops; any number of hosts.

    Examples
    --------
    >>> import tempfile, os
    >>> journal = os.path.join(tempfile.mkdtemp(), "journal.log")
    >>> with WorkerLease(None, journal) as lease:
    ...     sorted(WorkerLease(None, journal).dead([lease.id, "gone:1:0"]))
    ['gone:1:0']
    """

    def __init__(self, url: Optional[str], journal: os.PathLike):
        import socket
        import uuid

        self.url = url if url and url.startswith("postgresql") else None
        self.dir = Path(_journal_file(url, journal) + ".workers")
        self.id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._fh = self._conn = self._engine = None

    @staticmethod
    def _key(lease_id: str) -> int:
        import zlib

        return zlib.crc32(lease_id.encode()) % (2**31)

    def _path(self, lease_id: str) -> Path:
        import hashlib

        return self.dir / (hashlib.sha1(lease_id.encode()).hexdigest()[:20] + ".lock")

    def _engine_for_url(self):
        import sqlalchemy

        return sqlalchemy.create_engine(self.url, poolclass=sqlalchemy.pool.NullPool,
                                        connect_args={"connect_timeout": 5})

    def __enter__(self) -> "WorkerLease":
        if self.url:
            import sqlalchemy

            self._engine = self._engine_for_url()
            self._conn = self._engine.connect()
            self._conn.execute(sqlalchemy.text(
                f"SELECT pg_advisory_lock({_LEASE_CLASS}, {self._key(self.id)})"))
            self._conn.commit()
        else:
            import fcntl

            self.dir.mkdir(parents=True, exist_ok=True)
            self._fh = open(self._path(self.id), "w")
            fcntl.flock(self._fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._fh.write(self.id + "\n")
            self._fh.flush()
        return self

    def __exit__(self, *exc) -> bool:
        if self._conn is not None:
            self._conn.close()  # the server drops the advisory lock with the session
            self._engine.dispose()
            self._conn = None
        if self._fh is not None:
            try:
                self._path(self.id).unlink()
            except FileNotFoundError:
                pass
            self._fh.close()  # closing releases the flock
            self._fh = None
        return False

    def _dead_in(self, conn, lease_ids) -> set:
        import sqlalchemy

        gone = set()
        for lease_id in lease_ids:
            key = self._key(lease_id)
            if conn.execute(sqlalchemy.text(
                    f"SELECT pg_try_advisory_lock({_LEASE_CLASS}, {key})")).scalar():
                conn.execute(sqlalchemy.text(f"SELECT pg_advisory_unlock({_LEASE_CLASS}, {key})"))
                gone.add(lease_id)
        conn.commit()  # session-level locks outlive the transaction; do not idle inside one
        return gone

    def dead(self, lease_ids) -> set:
        """The ids among ``lease_ids`` whose worker process is gone (never this lease's own)."""
        lease_ids = set(lease_ids) - {self.id}
        if not lease_ids:
            return set()
        if self.url:
            if self._conn is not None:  # the lease's own session: no new connection per check
                return self._dead_in(self._conn, lease_ids)
            engine = self._engine_for_url()
            try:
                with engine.connect() as conn:
                    return self._dead_in(conn, lease_ids)
            finally:
                engine.dispose()
        import fcntl

        gone = set()
        for lease_id in lease_ids:
            path = self._path(lease_id)
            try:
                fh = open(path, "r+")
            except FileNotFoundError:
                gone.add(lease_id)
                continue
            with fh:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # its worker holds it: alive
                gone.add(lease_id)
                path.unlink(missing_ok=True)
        return gone


LEASE_ATTR, RETRY_ATTR = "nnpipe_worker", "retry_of"


def fail_orphaned_trials(study, lease: WorkerLease, storage) -> List[Tuple[int, bool]]:
    """Mark FAIL every RUNNING trial whose worker died, and enqueue each once more with the same
    parameters (a retry that dies too is not retried again).

    ``storage`` is the study's Optuna storage. Call it while holding the study's budget lock:
    workers tag a trial with their lease inside that lock, so a RUNNING trial without a tag
    belongs to a worker killed before it could. Returns ``(failed trial number, retried)`` pairs.
    """
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    if not running:
        return []
    dead = lease.dead({t.user_attrs[LEASE_ATTR] for t in running if LEASE_ATTR in t.user_attrs})
    study_id, done = None, []
    for t in running:
        owner = t.user_attrs.get(LEASE_ATTR)
        if owner is not None and owner not in dead:
            continue
        retry = RETRY_ATTR not in t.user_attrs
        reason = (f"worker {owner or '(unknown)'} died during the trial (its lease is gone); "
                  + ("retried once with the same parameters" if retry else
                     f"it was already a retry of trial {t.user_attrs[RETRY_ATTR]}, so not "
                     "retried again"))
        # Optuna has no public call that sets a user attribute on a trial this process did not
        # ask for; the storage's own public methods do it by (study id, trial number)
        if study_id is None:
            study_id = storage.get_study_id_from_name(study.study_name)
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
        try:
            storage.set_trial_user_attr(trial_id, "fail_reason", reason)
        except UpdateFinishedTrialError:
            continue  # finished meanwhile
        if study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True).state \
                != TrialState.FAIL:
            continue  # finished meanwhile (its worker was alive after all)
        if retry:
            study.enqueue_trial(dict(t.params), user_attrs={RETRY_ATTR: t.number})
        done.append((t.number, retry))
        logger.info("[search] trial %d: fail %s", t.number, reason)
    return done
