"""In-memory datasets and a batch iterator that slices tensors instead of collating items.

skorch's default ``DataLoader`` builds every batch item by item, which dominates the step time of
small networks on small data. When the data is an in-memory array, nnpipe moves it to the device
once and yields batches as slices of one permuted tensor per epoch.
"""

from __future__ import annotations

import math
from typing import Iterator, Optional, Tuple

import numpy as np
import torch
from skorch.dataset import Dataset

__all__ = ["TensorDataset", "TensorBatches"]


class TensorDataset(Dataset):
    """A skorch :class:`~skorch.dataset.Dataset` over tensors that already live on the device.

    It is a real skorch ``Dataset`` (``.X`` and ``.y`` are reachable, so skorch's scoring
    callbacks and ``data_from_dataset`` work), but it skips skorch's per-item conversion.
    """

    def __init__(self, X: torch.Tensor, y: Optional[torch.Tensor] = None):  # noqa: D107
        # skorch's Dataset.__init__ inspects and converts the data; ours is ready, so set the
        # attributes it would set.
        self.X, self.y = X, y
        self.length = len(X)
        self.X_indexing = self.y_indexing = None
        self.X_is_ndframe = False

    @classmethod
    def from_arrays(cls, X, y=None, device="cpu", y_dtype=None) -> "TensorDataset":
        if not torch.is_tensor(X):
            X = np.asarray(X, dtype=np.float32)
            X = X if X.flags.writeable else X.copy()
        X_t = torch.as_tensor(X, dtype=torch.float32, device=device)
        y_t = None
        if y is not None:
            y_t = torch.as_tensor(y if torch.is_tensor(y) else np.asarray(y), device=device)
            if y_dtype is not None:
                y_t = y_t.to(y_dtype)
        return cls(X_t, y_t)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i):
        return self.X[i], (self.y[i] if self.y is not None else torch.zeros(()))

    def subset(self, idx: np.ndarray) -> "TensorDataset":
        index = torch.as_tensor(idx, device=self.X.device, dtype=torch.long)
        return TensorDataset(self.X[index], None if self.y is None else self.y[index])


class TensorBatches:
    """Iterate over a :class:`TensorDataset` in batches of ``batch_size``.

    With ``shuffle=True`` one random permutation per epoch is drawn from ``generator`` (or torch's
    global generator), the data is gathered once in that order, and batches are contiguous slices.
    """

    def __init__(self, dataset: TensorDataset, batch_size: int, shuffle: bool = False,
                 generator: Optional[torch.Generator] = None):
        self.dataset = dataset
        self.batch_size = len(dataset) if batch_size == -1 else int(batch_size)
        self.shuffle = shuffle
        self.generator = generator

    def __len__(self) -> int:
        return math.ceil(len(self.dataset) / max(1, self.batch_size))

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, Optional[torch.Tensor]]]:
        X, y = self.dataset.X, self.dataset.y
        n = len(X)
        if self.shuffle and n > 1:
            perm = torch.randperm(n, generator=self.generator).to(X.device)
            X = X[perm]
            y = None if y is None else y[perm]
        for start in range(0, n, self.batch_size):
            stop = start + self.batch_size
            yield X[start:stop], (None if y is None else y[start:stop])
