"""Samples without an observed graph: a feature matrix with labels (DIFFormer learns the pairs)."""
import csv
from pathlib import Path
from typing import Literal, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor
from torch_geometric.data import Data
from torch_geometric.utils import to_undirected

from .base import NodeDataModule
from .splits import class_balanced_split

ArrayLike = Union[str, Path, np.ndarray, Tensor]


def read_array(source: ArrayLike, key: str = "x") -> Tensor:
    """A tensor from an array, or a ``.npy`` / ``.npz`` (member ``key``) / ``.pt`` / ``.csv`` file."""
    if isinstance(source, Tensor):
        return source
    if isinstance(source, np.ndarray):
        return torch.from_numpy(source)
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return torch.from_numpy(np.load(path))
    if suffix == ".npz":
        with np.load(path) as archive:
            if key not in archive:
                raise ValueError(f"{path} has no member {key!r} (it has {sorted(archive)})")
            return torch.from_numpy(archive[key])
    if suffix == ".pt":
        loaded = torch.load(path, weights_only=True)
        if isinstance(loaded, dict):
            if key not in loaded:
                raise ValueError(f"{path} has no key {key!r} (it has {sorted(loaded)})")
            loaded = loaded[key]
        return torch.as_tensor(loaded)
    if suffix == ".csv":
        return _read_csv(path)
    raise ValueError(f"{path}: unknown format {suffix!r}; use .npy, .npz, .pt or .csv")


def _read_csv(path: Path) -> Tensor:
    """Numeric rows of equal length (a non-numeric first row is a header); empty cells become NaN."""
    with open(path, newline="") as file:
        rows = list(csv.reader(file))
    while rows and not rows[-1]:  # blank lines at the end
        rows.pop()
    if rows and rows[0] and not _numeric(rows[0]):
        rows = rows[1:]
    if not rows or not any(rows):
        raise ValueError(f"{path} holds no rows")
    width = len(next(row for row in rows if row))
    # a blank line inside a one-column file is a missing value (its row keeps its place), as an empty cell
    rows = [row or [""] * width for row in rows] if width == 1 else rows
    values = []
    for line, row in enumerate(rows, start=1):
        if len(row) != width:
            raise ValueError(f"{path}: data row {line} has {len(row)} values, the first has {width}; every row "
                             f"needs the same number of columns")
        try:
            values.append([float(cell) if cell.strip() else float("nan") for cell in row])
        except ValueError:
            column = next(i for i, cell in enumerate(row) if cell.strip() and not _numeric([cell]))
            raise ValueError(f"{path}: data row {line}, column {column + 1} holds {row[column]!r}, not a number; "
                             f"every cell must be numeric (an empty cell is read as missing)") from None
    return torch.tensor(values).squeeze(1) if width == 1 else torch.tensor(values)


def _numeric(row) -> bool:
    try:
        [float(cell) for cell in row if cell.strip()]
    except ValueError:
        return False
    return True


def knn_graph(x: Tensor, k: int, block_rows: int = 2048) -> Tensor:
    """Undirected k-nearest-neighbour graph (Euclidean, no self loops) as ``edge_index [2, E]``.

    Pure torch, in blocks of ``block_rows`` queries, so memory is ``block_rows x N`` distances
    whatever N (torch-cluster's ``knn_graph`` is not needed).
    """
    num_samples = x.size(0)
    if not 1 <= k < num_samples:
        raise ValueError(f"k must be in [1, {num_samples - 1}] (fewer than the {num_samples} samples), got {k}")
    x = x.float()
    neighbours = []
    for start in range(0, num_samples, block_rows):
        distances = torch.cdist(x[start:start + block_rows], x)
        rows = torch.arange(start, min(start + block_rows, num_samples))
        distances[rows - start, rows] = float("inf")  # not one's own neighbour
        neighbours.append(distances.topk(k, dim=1, largest=False).indices)
    target = torch.arange(num_samples).repeat_interleave(k)
    return to_undirected(torch.stack([torch.cat(neighbours).flatten(), target]), num_nodes=num_samples)


def load_digits_arrays() -> Tuple[Tensor, Tensor]:
    """scikit-learn's handwritten digits (1,797 8x8 images, 10 classes; shipped with scikit-learn)."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    return torch.from_numpy(digits.data), torch.from_numpy(digits.target)


class FeatureDataModule(NodeDataModule):
    """A feature matrix with labels and no graph, full batch, with the reference's label-rate
    protocol: ``labels_per_class`` training samples per class, ``num_val`` validation samples,
    the rest test (one split, drawn with ``split_seed``, shared by all runs).

    ``features``/``labels``: arrays, or ``.npy``/``.npz``/``.pt``/``.csv`` files (``.npz``/``.pt``
    may hold both as ``x`` and ``y``; then ``labels`` may be omitted); or ``dataset='digits'``.
    ``knn > 0`` adds an undirected k-nearest-neighbour graph (for the graph term or the GCN
    baseline). Features are standardised per column unless ``standardize=False``.
    """

    def __init__(self, features: Optional[ArrayLike] = None, labels: Optional[ArrayLike] = None,
                 dataset: Optional[Literal["digits"]] = None, labels_per_class: int = 10, num_val: int = 1000,
                 knn: int = 0, split_seed: int = 123, standardize: bool = True, root: Optional[str] = None) -> None:
        if (features is None) == (dataset is None):
            raise ValueError("give either features (with labels) or dataset='digits'")
        if knn < 0:
            raise ValueError(f"knn must be >= 0 (0: no graph), got {knn}")
        super().__init__(root=root)
        self.features, self.labels, self.dataset = features, labels, dataset
        self.labels_per_class, self.num_val, self.knn = labels_per_class, num_val, knn
        self.split_seed, self.standardize = split_seed, standardize

    def load(self) -> Data:
        if self.dataset == "digits":
            x, y = load_digits_arrays()
        else:
            x = read_array(self.features, "x")
            y = read_array(self.labels if self.labels is not None else self.features, "y")
        x, y = _checked(x, y)
        if self.standardize:
            x = (x - x.mean(dim=0)) / x.std(dim=0).clamp_min(1e-6)
        num_classes = int(y.max()) + 1
        num_test = y.numel() - self.labels_per_class * num_classes - self.num_val
        if num_test < 1:
            raise ValueError(f"{y.numel()} samples cannot hold {self.labels_per_class} training samples for each of "
                             f"{num_classes} classes plus {self.num_val} validation samples and a test set; lower "
                             f"labels_per_class or num_val")
        data = Data(x=x, y=y, **class_balanced_split(y, self.labels_per_class, self.num_val, num_test, self.split_seed))
        if self.knn:
            data.edge_index = knn_graph(x, self.knn)
        return data


def _checked(x: Tensor, y: Tensor) -> Tuple[Tensor, Tensor]:
    if x.dim() != 2:
        raise ValueError(f"features must be a matrix [samples, features], got shape {tuple(x.shape)}")
    if y.dim() != 1 or y.numel() != x.size(0):
        raise ValueError(f"labels must be one per sample: {x.size(0)} feature rows, labels of shape {tuple(y.shape)}")
    if y.is_floating_point():
        missing = torch.isnan(y).nonzero().flatten()
        if missing.numel():
            raise ValueError(f"labels are missing for {missing.numel()} samples (first: row {int(missing[0])}); "
                             f"drop those samples or label them")
        if not torch.equal(y, y.round()):
            raise ValueError("labels must be whole class ids")
    if int(y.min()) < 0:
        raise ValueError(f"labels must be class ids >= 0, got {int(y.min())}")
    return x.float(), y.long()
