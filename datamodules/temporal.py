"""Spatio-temporal forecasting data from PyTorch Geometric Temporal's JSON files.

Each time step is one graph snapshot: node features are the ``lags`` previous values of every
node, the target its next value. Snapshots are split chronologically at PyTorch Geometric Temporal's
boundaries (``temporal_signal_split`` twice, as the reference's ``spatial-temporal/main.py``: 20% train,
20% validation, the rest test) and batched several at a time as separate graphs (a ``batch`` vector), so
DIFFormer's attention stays within each snapshot.
"""
import json
import urllib.request
from typing import Dict, List, Literal, Optional, Union, get_args

import torch
from torch_geometric.data import Data
from torch_geometric.loader import DataLoader

from difformer_lightning.io import atomic_file

from .base import DatasetNotFoundError, GraphDataModule, data_root, loader_generator

URL = "https://raw.githubusercontent.com/benedekrozemberczki/pytorch_geometric_temporal/master/dataset/{name}.json"
DEFAULT_LAGS = {"chickenpox": 4, "england_covid": 8, "wikivital_mathematics": 14}
TemporalName = Literal["chickenpox", "england_covid", "wikivital_mathematics"]
EdgeWeightTransform = Literal["none", "log1p", "max"]


def check_edge_weight_transform(transform: str) -> None:
    """Raises a ``ValueError`` naming the choices unless ``transform`` is an :data:`EdgeWeightTransform`."""
    if transform not in get_args(EdgeWeightTransform):
        raise ValueError(f"edge_weight_transform must be 'none', 'log1p' or 'max', got {transform!r}")


def _require(raw: dict, keys, source: str) -> None:
    for key in keys:
        if key not in raw:
            keys_found = sorted(map(str, raw))
            shown = ", ".join(keys_found[:8]) + (", ..." if len(keys_found) > 8 else "")
            raise ValueError(f"{source}: key {key!r} is missing (it has {shown}); expected a PyTorch "
                             f"Geometric Temporal JSON file")


def _zscore(values: torch.Tensor, epsilon: float, source: str) -> torch.Tensor:
    """PyG-Temporal's standardisation per node, in float64 as numpy computes it: ``(y - mean) / (std +
    epsilon)`` with the population standard deviation (``np.std``, ddof 0). A constant series with ``epsilon``
    0 would divide 0 by 0: a ``ValueError`` names the node instead."""
    values = values.double()
    std = values.std(dim=0, unbiased=False)
    if epsilon == 0 and bool((std == 0).any()):
        node = int((std == 0).nonzero()[0])
        raise ValueError(f"{source}: node {node}'s series is constant ({float(values[0, node])} at every time step; "
                         f"{int((std == 0).sum())} such nodes): the per-node z-score divides by its standard deviation, "
                         f"0. Drop the node or give it a varying series")
    return ((values - values.mean(dim=0)) / (std + epsilon)).float()


def _matrix(rows, key: str, source: str) -> torch.Tensor:
    """``rows`` (a list of per-time-step lists) as a float64 ``[T, N]`` tensor; a row of another length is named."""
    lengths = [len(row) if isinstance(row, list) else -1 for row in rows]
    if not lengths:
        raise ValueError(f"{source}: {key!r} holds no time steps")
    for step, length in enumerate(lengths):
        if length != lengths[0]:
            raise ValueError(f"{source}: {key!r} row {step} (time step {step}) has {length if length >= 0 else 'no list of'} "
                             f"values where row 0 has {lengths[0]} (one per node); the file is damaged or ragged")
    return torch.tensor(rows, dtype=torch.float64)


def snapshots_from_json(raw: dict, lags: int, source: str = "the JSON") -> List[Data]:
    """Snapshots ``Data(x [N, lags], y [N], edge_index, edge_weight)`` from a parsed file.

    Three layouts, read as PyTorch Geometric Temporal's loaders read them:

    * a static graph with the series in ``FX`` [T, N] (``edges``, optional ``weights``: chickenpox);
    * a graph per day (``edge_mapping``, ``time_periods``, ``y`` [T, N]: england_covid), values z-scored per
      node as ``EnglandCovidDatasetLoader`` does (``np.std``, plus 1e-10);
    * a static weighted graph with each step's values under its own key (``edges``, ``weights``,
      ``time_periods``, ``"<t>": {"y": [N]}``: wikivital_mathematics), z-scored per node as
      ``WikiMathsDatasetLoader`` does (``np.std``, no epsilon).
    """
    if "edge_mapping" in raw:
        _require(raw, ("time_periods", "y"), source)
        _require(raw["edge_mapping"], ("edge_index", "edge_weight"), f"{source} edge_mapping")
        values = _zscore(_matrix(raw["y"], "y", source), 1e-10, source)
        graphs = [(torch.tensor(raw["edge_mapping"]["edge_index"][str(t)]).t(),
                   torch.tensor(raw["edge_mapping"]["edge_weight"][str(t)], dtype=torch.float32))
                  for t in range(values.size(0))]
    elif "FX" in raw:
        _require(raw, ("edges",), source)
        values = _matrix(raw["FX"], "FX", source).float()
        graphs = [_static_graph(raw)] * values.size(0)
    elif "time_periods" in raw:
        _require(raw, ("edges", "weights"), source)
        steps = int(raw["time_periods"])
        _require(raw, [str(t) for t in range(steps)], source)
        values = _zscore(_matrix([raw[str(t)]["y"] for t in range(steps)], "<t>.y", source), 0.0, source)
        graphs = [_static_graph(raw)] * steps
    else:  # none of the three: name the series key of the simplest layout, and the others
        _require(raw, ("FX",), source + " (layouts: FX with edges; edge_mapping with y; time_periods with '<t>' keys)")
    steps, num_nodes = values.size(0), values.size(1)
    if not 1 <= lags < steps:
        raise ValueError(f"{source}: lags must be in [1, {steps - 1}] (the series has {steps} time steps), got {lags}")
    bad = (~torch.isfinite(values)).nonzero()
    if bad.numel():
        step, node = (int(v) for v in bad[0])
        raise ValueError(f"{source}: the value of node {node} at time step {step} is {float(values[step, node])} "
                         f"(NaN or infinite; {bad.size(0)} such values); impute or drop them before training")
    for step, (edges, weights) in enumerate(graphs[:steps]):
        if edges.numel() and (int(edges.min()) < 0 or int(edges.max()) >= num_nodes):
            position = int(((edges < 0) | (edges >= num_nodes)).any(dim=0).nonzero()[0])
            raise ValueError(f"{source}: edge {position} of time step {step} is {edges[:, position].tolist()}, but "
                             f"the series has {num_nodes} nodes (ids 0..{num_nodes - 1})")
        if not bool(torch.isfinite(weights).all()):
            raise ValueError(f"{source}: time step {step} has a NaN or infinite edge weight")
    edge_index = {id(edges): edges.long() for edges, _ in graphs[:steps]}  # a static graph stays one tensor
    return [Data(x=values[t:t + lags].t().contiguous(), y=values[t + lags], edge_index=edge_index[id(graphs[t][0])],
                 edge_weight=graphs[t][1]) for t in range(steps - lags)]


def _static_graph(raw: dict):
    edges = torch.tensor(raw["edges"]).t()
    weights = torch.tensor(raw["weights"], dtype=torch.float32) if "weights" in raw else torch.ones(edges.size(1))
    return edges, weights


def chronological_split(snapshots: List[Data], train: float = 0.2, val: float = 0.2) -> Dict[str, List[Data]]:
    """Train / validation / test snapshots in time order, cut where the reference cuts them.

    The reference (``spatial-temporal/main.py``) calls PyTorch Geometric Temporal's ``temporal_signal_split``
    twice: ``int(train * T)`` snapshots for training, then ``int(val / (1 - train) * R)`` of the ``R`` left
    for validation, the rest test. On england_covid's 53 snapshots that is 10 / 10 / 33 (a single cut at
    ``int(0.4 * T)`` would give 10 / 11 / 32); on chickenpox's 517, 103 / 103 / 311.

    Raises:
        ValueError: a split would be empty.
    """
    first = int(train * len(snapshots))
    second = first + int(val / (1 - train) * (len(snapshots) - first))
    if first < 1 or second <= first or second >= len(snapshots):
        raise ValueError(f"{len(snapshots)} snapshots are too few for a {train}/{val}/rest split")
    return {"train": snapshots[:first], "val": snapshots[first:second], "test": snapshots[second:]}


def transform_edge_weights(snapshots: List[Data], transform: EdgeWeightTransform) -> List[Data]:
    """``edge_weight`` of every snapshot transformed: ``'none'`` keeps the raw values (the reference: on
    england_covid raw trip counts from 10 to 957,114, which make the graph term thousands of times the
    attention term), ``'log1p'`` takes :math:`\\log(1 + w)`, ``'max'`` divides each snapshot's weights by its
    largest (weights in (0, 1]). Snapshots sharing one graph share its transformed weights.

    Raises:
        ValueError: an unknown ``transform``, or a negative weight under ``'log1p'``/``'max'``.
    """
    check_edge_weight_transform(transform)
    if transform == "none":
        return snapshots
    done: Dict[int, torch.Tensor] = {}
    for step, snapshot in enumerate(snapshots):
        weight = snapshot.edge_weight
        if id(weight) not in done:
            if weight.numel() and float(weight.min()) < 0:
                raise ValueError(f"time step {step} has a negative edge weight ({float(weight.min())}): "
                                 f"edge_weight_transform {transform!r} needs weights >= 0; use 'none'")
            largest = float(weight.max()) if weight.numel() else 1.0
            done[id(weight)] = weight.log1p() if transform == "log1p" else weight / (largest or 1.0)
        snapshot.edge_weight = done[id(weight)]
    return snapshots


class TemporalDataModule(GraphDataModule):
    """Snapshots of a PyG-Temporal dataset, ``snapshots_per_batch`` graphs per optimiser step.

    Looks for ``<root>/temporal/<name>.json`` (root: ``root``, ``$DIFFORMER_DATA`` or ``./data``)
    and downloads it there where the network allows. ``lags`` defaults to the reference's (4 for
    chickenpox, 8 for england_covid, 14 for wikivital_mathematics).

    ``snapshots_per_batch``: graphs per batch, or ``"all"``: every snapshot of a split in one batch,
    so one optimiser step per epoch on the mean loss over all training snapshots (the reference's
    protocol on chickenpox and england_covid). ``edge_weight_transform``: see
    :func:`transform_edge_weights` (``"none"``, the reference, keeps raw weights).
    """

    # What train.py links into the model: one value per node, predicted by NodeRegressor.
    task_family = "regression"
    num_outputs = 1
    task = "regression"
    metric = "mse"

    def __init__(self, name: TemporalName = "chickenpox", lags: Optional[int] = None,
                 snapshots_per_batch: Union[int, Literal["all"]] = 8, edge_weight_transform: EdgeWeightTransform = "none",
                 root: Optional[str] = None) -> None:
        super().__init__()
        if snapshots_per_batch != "all" and (not isinstance(snapshots_per_batch, int) or snapshots_per_batch < 1):
            raise ValueError(f"snapshots_per_batch must be an integer >= 1 or 'all' (one batch a split), got "
                             f"{snapshots_per_batch!r}")
        check_edge_weight_transform(edge_weight_transform)
        self.name, self.lags = name, lags if lags is not None else DEFAULT_LAGS.get(name, 4)
        self.snapshots_per_batch, self.edge_weight_transform = snapshots_per_batch, edge_weight_transform
        self.path = data_root(root) / "temporal" / f"{name}.json"
        self._splits: Optional[Dict[str, List[Data]]] = None

    def prepare_data(self) -> None:
        if self.path.is_file():
            return
        try:
            with urllib.request.urlopen(URL.format(name=self.name), timeout=60) as response, \
                    atomic_file(self.path) as handle:
                handle.write(response.read())
        except OSError as error:
            raise DatasetNotFoundError(f"{self.path} is missing and could not be downloaded ({error}); copy "
                                       f"{self.name}.json from PyTorch Geometric Temporal's dataset folder there")

    @property
    def splits(self) -> Dict[str, List[Data]]:
        if self._splits is None:
            if not self.path.is_file():
                self.prepare_data()
            try:
                raw = json.loads(self.path.read_text())
            except json.JSONDecodeError as error:
                raise ValueError(f"{self.path}: not valid JSON at line {error.lineno}, column {error.colno} "
                                 f"({error.msg}); the file is cut short or damaged: download it again") from None
            snapshots = snapshots_from_json(raw, self.lags, str(self.path))
            self._splits = chronological_split(transform_edge_weights(snapshots, self.edge_weight_transform))
        return self._splits

    @property
    def num_features(self) -> int:
        return self.lags

    @property
    def num_nodes(self) -> int:
        """Nodes of one snapshot."""
        return self.splits["train"][0].num_nodes

    @property
    def max_batch_nodes(self) -> int:
        """Attention runs within one snapshot at a time: its nodes."""
        return self.num_nodes

    def describe(self) -> Dict[str, object]:
        """What a checkpoint records about this data, to refuse resuming on other data."""
        splits = self.splits
        first = splits["train"][0]
        return {"dataset": f"{type(self).__name__}:{self.name}", "num_nodes": first.num_nodes,
                "num_edges": first.num_edges, "num_features": self.lags, "num_classes": 1,
                "num_snapshots": sum(len(part) for part in splits.values()),
                "split": [len(splits[part]) for part in ("train", "val", "test")],
                "edge_weight_transform": self.edge_weight_transform, "batch_size": self.snapshots_per_batch}

    def probe_batch(self, num_nodes: int, seed: int = 0) -> Data:
        """The first training snapshot (all its nodes; ``num_nodes`` does not cut a snapshot)."""
        return self.splits["train"][0]

    def setup(self, stage: str) -> None:
        self.splits  # noqa: B018  loads and checks before training

    def _loader(self, split: str) -> DataLoader:
        snapshots = self.splits[split]
        size = len(snapshots) if self.snapshots_per_batch == "all" else self.snapshots_per_batch
        return DataLoader(snapshots, batch_size=size, shuffle=False, generator=loader_generator())

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> List[DataLoader]:
        # Test snapshots are evaluated beside validation ones, to report test at the best validation.
        return [self._loader("val"), self._loader("test")]

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

