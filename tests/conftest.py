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
