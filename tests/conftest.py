"""Shared fixtures: small data made in-process (nothing is downloaded)."""

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's embedded digits, scaled to [0, 1], 25% stratified test split (seed 0)."""
    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    return train_test_split(X, y, test_size=0.25, stratify=y, random_state=0)


@pytest.fixture(scope="session")
def blobs():
    """A small, easy 3-class problem for fast behavioural tests."""
    rng = np.random.RandomState(0)
    centers = rng.normal(scale=3.0, size=(3, 8))
    y = rng.randint(0, 3, size=300)
    X = (centers[y] + rng.normal(size=(300, 8))).astype(np.float32)
    return X, y


PG_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432"


@pytest.fixture
def pg_url():
    """The URL of a fresh, empty database on the local PostgreSQL server (so workers also race
    to create Optuna's or MLflow's tables); dropped after the test. Skips without a server."""
    import uuid

    psycopg = pytest.importorskip("psycopg")
    name = f"nnpipe_{uuid.uuid4().hex[:10]}"
    try:
        admin = psycopg.connect("postgresql://postgres@127.0.0.1:5432/test", autocommit=True,
                                connect_timeout=3)
    except Exception as exc:  # noqa: BLE001 - any failure to connect means "no server"
        pytest.skip(f"no PostgreSQL server at 127.0.0.1:5432: {exc}")
    try:
        admin.execute(f'CREATE DATABASE "{name}"')
        yield f"{PG_SERVER}/{name}"
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()
