"""Search under faults: a worker killed mid-trial, and a journal torn by a crash during append.

Every fault is real: the worker is a separate ``python -m pipelines.search --worker`` process
killed with SIGKILL while a trial runs; the torn journal is a real study's file cut mid-line.
"""

import json
import os
import signal
import subprocess
import sys
import time
import uuid
import warnings

import pytest
import yaml

from nnpipe.reliability import JournalRepairWarning, WorkerLease, check_journal

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _params(storage, study_name, n_trials, epochs):
    return {
        "model": {"module": "mlp", "module__hidden_sizes": [64, 64]},
        "train": {"max_epochs": epochs, "random_state": 0, "verbose": 0, "train_split": None},
        "search": {"enabled": True, "n_trials": n_trials, "folds": 2, "pruner": "none",
                   "storage": storage, "study_name": study_name, "random_state": 0,
                   "space": {"train.lr": {"type": "float", "low": 1e-3, "high": 3e-2,
                                          "log": True}}},
        "tracking": {"enabled": False},
    }


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    from nnpipe.data import load_dataset, save_dataset

    path = tmp_path_factory.mktemp("data") / "data"
    save_dataset(load_dataset("digits"), path)
    return path


def _worker(tmp_path, digits_dir, params):
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(params))
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "pipelines.search", "--worker", "--params",
           str(tmp_path / "p.yaml"), "--data", str(digits_dir),
           "--journal", str(tmp_path / "journal.log")]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=tmp_path)


def _load(storage, name, tmp_path):
    """The study the workers run: ``<name>-<fingerprint>`` (there is only one here)."""
    import optuna

    from nnpipe.search import storage_from_url

    opened = storage_from_url(storage, tmp_path / "journal.log")
    names = [n for n in optuna.get_all_study_names(opened) if n.startswith(name + "-")]
    assert len(names) <= 1, names
    if not names:
        raise LookupError(f"no study {name}-* yet")
    return optuna.load_study(study_name=names[0], storage=opened)


def _kill_mid_trial(worker, storage, name, tmp_path):
    """Wait until trial 0 has finished and trial 1 is RUNNING, then SIGKILL the worker."""
    from optuna.trial import TrialState

    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        assert worker.poll() is None, worker.stdout.read()
        try:
            trials = _load(storage, name, tmp_path).get_trials()
        except Exception:  # noqa: BLE001 - the study may not exist yet
            trials = []
        states = [t.state for t in trials]
        if states[:1] == [TrialState.COMPLETE] and states[1:] == [TrialState.RUNNING] \
                and trials[1].params:
            worker.send_signal(signal.SIGKILL)
            worker.wait(30)
            return trials
        time.sleep(0.2)
    worker.kill()
    raise AssertionError("trial 1 never started")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["journal", "postgresql"])
def test_a_worker_killed_mid_trial_leaves_a_failed_trial_retried_once_and_an_exact_budget(
        backend, tmp_path, digits_dir, request):
    from optuna.trial import TrialState

    storage = request.getfixturevalue("pg_url") if backend == "postgresql" else None
    name = f"kill-{uuid.uuid4().hex[:6]}"
    params = _params(storage, name, n_trials=3, epochs=12)
    first = _worker(tmp_path, digits_dir, params)
    before = _kill_mid_trial(first, storage, name, tmp_path)
    # the kill left trial 1 RUNNING: nobody is left to finish it
    assert _load(storage, name, tmp_path).get_trials()[1].state == TrialState.RUNNING
    second = _worker(tmp_path, digits_dir, params)
    out = second.communicate(timeout=600)[0]
    assert second.returncode == 0, out
    trials = _load(storage, name, tmp_path).get_trials()
    # the completed trial survived untouched
    assert trials[0].state == TrialState.COMPLETE and trials[0].value == before[0].value
    killed = trials[1]
    assert killed.state == TrialState.FAIL
    assert "died during the trial" in killed.user_attrs["fail_reason"]
    retries = [t for t in trials if t.user_attrs.get("retry_of") == 1]
    assert len(retries) == 1 and retries[0].params == killed.params
    assert retries[0].state == TrialState.COMPLETE
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 3  # exactly the budget
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert "trial 1: fail worker" in out


def test_a_retry_whose_worker_dies_too_is_failed_but_not_retried_again(tmp_path):
    import optuna
    from optuna.trial import TrialState

    from nnpipe.reliability import LEASE_ATTR, fail_orphaned_trials
    from nnpipe.search import storage_from_url

    journal = tmp_path / "j.log"
    storage = storage_from_url(None, journal)
    study = optuna.create_study(storage=storage)
    with WorkerLease(None, journal) as dead:  # a worker that ran a trial, then vanished
        trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
        trial.set_user_attr(LEASE_ATTR, dead.id)
    with WorkerLease(None, journal) as alive:
        busy = study.ask()
        busy.set_user_attr(LEASE_ATTR, alive.id)
        assert fail_orphaned_trials(study, alive, storage) == [(0, True)]
        retry = study.ask()  # the enqueued retry comes first, with the same parameters
        assert retry.user_attrs["retry_of"] == 0
        assert retry.suggest_float("x", 0, 1) == trial.params["x"]
    with WorkerLease(None, journal) as third:
        # both the retry's and the busy trial's workers are gone now
        assert sorted(fail_orphaned_trials(study, third, storage)) == [(1, True), (2, False)]
    states = {t.number: t.state for t in study.get_trials()}
    assert states[0] == states[1] == states[2] == TrialState.FAIL
    assert "not retried again" in study.get_trials()[2].user_attrs["fail_reason"]
    assert [t.user_attrs.get("retry_of") for t in study.get_trials()][3:] == [1]


def test_a_live_workers_trial_is_never_taken_for_an_orphan(tmp_path):
    """The lease is held by another *process*: a check from here must see it alive."""
    journal = tmp_path / "j.log"
    code = ("import sys, time; from nnpipe.reliability import WorkerLease\n"
            f"lease = WorkerLease(None, {str(journal)!r}).__enter__()\n"
            "print(lease.id, flush=True); time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                             env=dict(os.environ, PYTHONPATH=ROOT))
    try:
        lease_id = child.stdout.readline().strip()
        with WorkerLease(None, journal) as me:
            assert me.dead([lease_id]) == set()
            child.send_signal(signal.SIGKILL)
            child.wait(10)
            assert me.dead([lease_id]) == {lease_id}
    finally:
        child.kill()


# --------------------------------------------------------------------------- torn journal


def _journal_with_trials(tmp_path, n=3):
    import optuna

    from nnpipe.search import storage_from_url

    journal = tmp_path / "journal.log"
    study = optuna.create_study(study_name="s", storage=storage_from_url(None, journal))
    study.optimize(lambda t: t.suggest_float("x", 0, 1) ** 2, n_trials=n)
    return journal, [t.value for t in study.trials]


@pytest.mark.parametrize("cut", [1, 7, 0.5, -2])
def test_a_journal_torn_mid_append_is_repaired_before_anything_is_appended(tmp_path, cut):
    """A real crash during append: the last entry's bytes end partway (``cut`` bytes in, or a
    fraction of it); the study opens, keeps every completed trial and takes new ones."""
    import optuna

    from nnpipe.search import storage_from_url

    journal, values = _journal_with_trials(tmp_path)
    data = journal.read_bytes()
    last = data.rstrip(b"\n").rsplit(b"\n", 1)[-1]
    kept = len(data) - len(last) - 1
    torn = int(len(last) * cut) if isinstance(cut, float) else cut % len(last)
    journal.write_bytes(data[:kept] + last[:torn])
    with pytest.warns(JournalRepairWarning, match="cut mid-write"):
        storage = storage_from_url(None, journal)
    assert journal.read_bytes() == data[:kept]  # the intact part, byte for byte
    assert (tmp_path / "journal.log.torn").read_bytes() == last[:torn]
    study = optuna.load_study(study_name="s", storage=storage)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    for line in journal.read_bytes().splitlines():
        json.loads(line)  # every line is whole JSON: nothing was appended after torn bytes
    again = optuna.load_study(study_name="s", storage=storage_from_url(None, journal))
    completed = [t.value for t in again.trials if t.state.name == "COMPLETE"]
    assert completed[:2] == values[:2] and len(completed) >= 4


def test_a_journal_damaged_before_its_last_line_is_refused_with_a_clear_message(tmp_path):
    journal, _ = _journal_with_trials(tmp_path)
    lines = journal.read_bytes().split(b"\n")
    lines[2] = lines[2][:10]
    journal.write_bytes(b"\n".join(lines))
    before = journal.read_bytes()
    with pytest.raises(ValueError, match=r"line 3 is not valid JSON; the journal is damaged"):
        check_journal(journal)
    assert journal.read_bytes() == before  # refused, not touched


def test_an_intact_journal_is_left_alone(tmp_path):
    journal, _ = _journal_with_trials(tmp_path)
    before = journal.read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_journal(journal) is False
    assert journal.read_bytes() == before and not (tmp_path / "journal.log.torn").exists()


@pytest.mark.slow
def test_a_worker_killed_while_appending_never_breaks_the_next_open(tmp_path):
    """SIGKILL a process that appends to the journal as fast as it can (plain Optuna: the
    writer need not know about nnpipe), 8 times at random moments; every time, nnpipe's next
    open works and the completed trials are all there."""
    import random

    import optuna

    from nnpipe.search import storage_from_url

    journal = tmp_path / "journal.log"
    code = ("import optuna\n"
            "from optuna.storages import JournalStorage\n"
            "from optuna.storages.journal import JournalFileBackend\n"
            "optuna.logging.set_verbosity(optuna.logging.ERROR)\n"
            f"s = optuna.create_study(study_name='s', load_if_exists=True, "
            f"storage=JournalStorage(JournalFileBackend({str(journal)!r})))\n"
            "print('go', flush=True)\n"
            "s.optimize(lambda t: sum(t.suggest_float(f'x{i}', 0, 1) for i in range(20)),"
            " n_trials=100000)\n")
    rng = random.Random(0)
    completed, repaired = 0, 0
    for _ in range(8):
        child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "go", child.stderr.read()
        time.sleep(rng.uniform(0.02, 0.3))
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", JournalRepairWarning)
            study = optuna.load_study(study_name="s", storage=storage_from_url(None, journal))
        repaired += any(issubclass(w.category, JournalRepairWarning) for w in caught)
        now = sum(t.state.name == "COMPLETE" for t in study.trials)
        assert now >= completed  # nothing completed was lost
        completed = now
    assert completed > 0
    print(f"{repaired} of 8 kills tore the journal's last line")
