"""Issue #7 item 5: a save killed with SIGKILL at any moment leaves a loadable model, exactly the
old version or the new one: never a torn file, a mixture, or an exception on load.

Each try forks a child (from a forkserver that imported torch once, so no try pays the import),
which loads two saved versions A and B of a model, saves A completely to the target directory,
says "ready" and then saves B, A, B, ... to that directory in a loop. The parent kills it with
SIGKILL after a random delay spread over two save cycles, then loads the directory. For the
training checkpoint the versions are the epochs: a callback placed before :class:`Checkpoint`
writes each epoch's reference predictions (atomically) before the checkpoint of that epoch. Every
tenth try also saves (or resumes training) over the killed directory: a SIGKILLed save leaves no
lock or debris that blocks the next one.

A second test has two processes save A and B in turn to one directory while the parent loads it.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from skorch.callbacks import Callback

import nnpipe
from nnpipe import EnsembleClassifier, NNClassifier
from nnpipe.checkpoint import Checkpoint, load_checkpoint
from nnpipe.persist import atomic_write_bytes

pytestmark = pytest.mark.slow

TRIES = 50
_PROBE = np.random.RandomState(1).normal(size=(64, 8)).astype(np.float32)


def _data():
    rng = np.random.RandomState(0)
    y = rng.randint(0, 3, size=240)
    X = (rng.normal(scale=3.0, size=(3, 8))[y] + rng.normal(size=(240, 8))).astype(np.float32)
    return X, y


def _net(seed: int, **kwargs) -> NNClassifier:
    kwargs.setdefault("max_epochs", 2)
    return NNClassifier(module__hidden_sizes=[32], lr=0.01, random_state=seed, **kwargs)


# --------------------------------------------------------------------------- the child


def _cycle(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _child(kind: str, refs: list, target: str, conn) -> None:
    import torch

    torch.set_num_threads(1)
    if kind == "checkpoint":
        return _checkpoint_child(target, conn)
    a, b = nnpipe.load(refs[0]), nnpipe.load(refs[1])
    nnpipe.save(a, target)  # a complete version exists before any kill can land
    period = _cycle(lambda: (nnpipe.save(b, target), nnpipe.save(a, target)))
    conn.send(("ready", period))
    while True:
        nnpipe.save(b, target)
        nnpipe.save(a, target)


class _RecordReference(Callback):
    """Before each epoch's checkpoint: write what that epoch's net predicts, atomically."""

    def __init__(self, directory: str):
        self.directory = directory

    def on_epoch_end(self, net, **kwargs):
        buf = io.BytesIO()
        np.save(buf, net.predict_proba(_PROBE))
        atomic_write_bytes(Path(self.directory) / f"ref-{len(net.history)}.npy", buf.getvalue())


def _checkpoint_child(target: str, conn) -> None:
    X, y = _data()
    refs = str(Path(target).parent / "refs")

    def run(seed):
        _net(seed, max_epochs=4, train_split=None, callbacks=[
            _RecordReference(refs), Checkpoint(target, monitor=None)]).fit(X, y)

    period = _cycle(lambda: run(0)) / 2  # two epochs' saves, as long as a save of A and B
    conn.send(("ready", period))
    seed = 1
    while True:
        run(seed)
        seed += 1


# --------------------------------------------------------------------------- the parent


@pytest.fixture(scope="module")
def ctx():
    context = mp.get_context("forkserver")
    # torch imports torch._dynamo lazily on the first optimizer (~3 s): do it once, in the server
    context.set_forkserver_preload(["torch", "torch._dynamo", "skops.io", "nnpipe",
                                    "nnpipe.checkpoint", __name__])
    return context


@pytest.fixture(scope="module")
def versions(tmp_path_factory):
    """Two fitted versions of a kind, saved, and their predictions (the references)."""
    X, y = _data()
    root, cache = tmp_path_factory.mktemp("versions"), {}

    def get(kind):
        if kind == "checkpoint" or kind in cache:
            return cache.get(kind, ([], []))
        paths, probas = [], []
        for seed in (0, 1):
            if kind == "model":
                est = _net(seed).fit(X, y)
            else:
                est = EnsembleClassifier(_net(0), n_members=3, combine="stacking",
                                         validation_fraction=0.25, random_state=10 * seed)
                est.fit(X, y)
            path = nnpipe.save(est, root / f"{kind}-{seed}")
            paths.append(str(path))
            probas.append(nnpipe.load(path).predict_proba(_PROBE))
        assert not np.array_equal(probas[0], probas[1])  # the versions are distinguishable
        cache[kind] = paths, probas
        return cache[kind]

    return get


def _leftovers(directory: Path) -> bool:
    """Did the kill land inside a save (temporary files or unreferenced parts left behind)?"""
    names = {p.name for p in directory.iterdir()}
    if any(n.endswith(".tmp") for n in names):
        return True
    manifest = (directory / "model.json").read_text()
    parts = {n for n in names if n.startswith(("weights-", "member-", "meta-"))}
    return any(n not in manifest for n in parts) or any(
        _leftovers(directory / n) for n in parts if n.startswith("member-"))


def _kill_at_random(ctx, kind, refs, target: Path, rng) -> float:
    parent_conn, child_conn = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(kind, refs, str(target), child_conn), daemon=True)
    proc.start()
    child_conn.close()
    try:
        try:
            _, period = parent_conn.recv() if parent_conn.poll(120) else (None, None)
        except EOFError:
            period = None
        if period is None:
            raise AssertionError(f"the {kind} child never started its save loop (exit code "
                                 f"{proc.exitcode}; its traceback is on stderr)")
        delay = rng.uniform(0, 2 * period)
        time.sleep(delay)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(30)
    assert proc.exitcode == -signal.SIGKILL
    return delay


@pytest.mark.parametrize("kind", ["model", "checkpoint", "ensemble"])
def test_a_killed_save_leaves_the_old_or_the_new_version(kind, versions, ctx, tmp_path):
    rng = random.Random(f"{kind}-{os.getpid()}-{time.time()}")
    refs, probas = versions(kind)
    torn, delays = 0, []
    for attempt in range(TRIES):
        target = tmp_path / f"try-{attempt}" / "model"
        delays.append(_kill_at_random(ctx, kind, refs, target, rng))
        loaded = nnpipe.load(target)  # never an exception
        got = loaded.predict_proba(_PROBE)
        if kind == "checkpoint":
            epoch = len(loaded.history)  # the epoch its history says; weights must match
            ref = target.parent / "refs" / f"ref-{epoch}.npy"
            np.testing.assert_array_equal(got, np.load(ref), err_msg=f"try {attempt}")
        else:
            matches = [i for i, p in enumerate(probas) if np.array_equal(got, p)]
            assert matches, f"try {attempt}: the loaded {kind} is neither version A nor B"
        torn += _leftovers(target)
        if attempt % 10 == 0:  # the next save over a killed one works: resave, or resume
            if kind == "checkpoint":
                loaded.set_params(max_epochs=1, callbacks=[Checkpoint(target, monitor=None)])
                loaded.partial_fit(*_data())
                assert len(load_checkpoint(target).history) == epoch + 1
            else:
                nnpipe.save(nnpipe.load(refs[1]), target)
                np.testing.assert_array_equal(nnpipe.load(target).predict_proba(_PROBE),
                                              probas[1])
            assert not _leftovers(target), sorted(p.name for p in target.iterdir())
    # the kills did land inside saves (else this test would prove nothing)
    assert torn >= 1, f"no kill of {TRIES} landed inside a save (delays {min(delays):.4f}-" \
                      f"{max(delays):.4f} s)"
    print(f"{kind}: {torn}/{TRIES} kills landed inside a save")


@pytest.mark.parametrize("kind", ["model", "ensemble"])
def test_loads_during_concurrent_saves_see_the_old_or_the_new_version(kind, versions, ctx,
                                                                      tmp_path):
    """Two processes save A and B in turn to one directory while this one loads from it: every
    load gives A or B exactly (a save's clean-up never removes parts another save is about to
    commit, and a load that loses the race re-reads the new version), also after SIGKILL."""
    refs, probas = versions(kind)
    target, conns, procs = tmp_path / "model", [], []
    for order in (refs, refs[::-1]):
        parent_conn, child_conn = ctx.Pipe(duplex=False)
        procs.append(ctx.Process(target=_child, args=(kind, order, str(target), child_conn),
                                 daemon=True))
        procs[-1].start()
        child_conn.close()
        conns.append(parent_conn)
    try:
        for conn in conns:
            assert conn.poll(120) and conn.recv()[0] == "ready"
        seen, deadline = [0, 0], time.monotonic() + 3
        while time.monotonic() < deadline:
            got = nnpipe.load(target).predict_proba(_PROBE)
            matches = [i for i, p in enumerate(probas) if np.array_equal(got, p)]
            assert matches, f"load {sum(seen)}: the loaded {kind} is neither version A nor B"
            seen[matches[0]] += 1
    finally:
        for proc in procs:
            os.kill(proc.pid, signal.SIGKILL)
            proc.join(30)
    assert min(seen) >= 1, f"the loads never saw both versions ({seen}): no concurrency tested"
    got = nnpipe.load(target).predict_proba(_PROBE)
    assert any(np.array_equal(got, p) for p in probas)
