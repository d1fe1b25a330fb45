"""Any node-classification dataset of ``torch_geometric.datasets``, by name, and the LINKX random split."""
import difflib
import inspect
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch_geometric.datasets
from torch import Tensor
from torch_geometric.data import Data
from torch_geometric.utils import to_undirected

from difformer_lightning.contracts import SPLITS

from .base import DAMAGED_FILE_ERRORS, DatasetNotFoundError, NodeDataModule, damaged_raw_files
from .prepare import load_pyg_dataset

# Where each family's files live under the data root (the layout of ../shared/data): <root>/<folder>/...
FOLDERS = {"HeterophilousGraphDataset": "heterophilous", "LINKXDataset": "linkx", "WikipediaNetwork": "wikipedia"}
# Binary tasks the literature reports as ROC-AUC (Platonov et al. 2023): the class-1 probability is scored.
ROC_AUC = {("HeterophilousGraphDataset", "minesweeper"), ("HeterophilousGraphDataset", "tolokers"),
           ("HeterophilousGraphDataset", "questions")}


def random_split(y: Tensor, seed: int, train: float = 0.5, val: float = 0.25) -> Dict[str, Tensor]:
    """LINKX's ``rand_train_test_idx``: the labelled nodes (``y >= 0``; ``-1`` is unlabelled) in a random
    order, the first ``train`` share for training, the next ``val`` share for validation, the rest test;
    unlabelled nodes are in no split. Drawn from ``numpy``'s generator seeded with ``seed`` (LINKX draws
    from the global one), so split ``k`` is the same in every run. Returns boolean masks ``[N]``."""
    labelled = (y >= 0).nonzero().flatten() if y.dim() == 1 else torch.arange(y.size(0))
    order = torch.from_numpy(np.random.default_rng(seed).permutation(labelled.numel()))
    first, second = int(labelled.numel() * train), int(labelled.numel() * train) + int(labelled.numel() * val)
    parts = {"train": order[:first], "val": order[first:second], "test": order[second:]}
    masks = {}
    for split, positions in parts.items():
        mask = torch.zeros(y.size(0), dtype=torch.bool)
        mask[labelled[positions]] = True
        masks[f"{split}_mask"] = mask
    return masks


def _asserted_names(dataset_class) -> List[str]:
    """The names a PyG dataset class's ``__init__`` compares ``name`` against (the string constants of its code:
    PyG asserts ``self.name in [...]`` and has no public list), for an error message only."""
    names, code = [], dataset_class.__init__.__code__
    for constant in code.co_consts:
        for value in constant if isinstance(constant, (tuple, frozenset)) else (constant,):
            if (isinstance(value, str) and value.isidentifier() and value.lower() == value and value.strip("_")
                    and value not in names):
                names.append(value)
    return [name for name in names if name not in code.co_varnames]  # not a keyword passed on


class PyGDataModule(NodeDataModule):
    """A node-classification dataset class of ``torch_geometric.datasets``, full batch.

    ``dataset`` names the class (``HeterophilousGraphDataset``, ``WebKB``, ``Actor``, ``WikipediaNetwork``,
    ``LINKXDataset``, ``Amazon``, ``Coauthor``, ...) and ``name`` its dataset where it takes one
    (``Minesweeper``, ``cornell``, ``reed98``, ...). PyG downloads, caches and preprocesses the files under
    ``<root>/<folder>`` (``root``, else ``$DIFFORMER_DATA``, else ``./data``; the folder is ``heterophilous``,
    ``linkx``, ``wikipedia`` or the class name in lower case, as in ``../shared/data``); two processes
    preparing it take turns (a file lock).

    Splits: datasets with several fixed splits (masks ``[N, S]``: geom-gcn's 10 splits, Platonov's 10) use
    split ``split``; datasets without masks get LINKX's random split (``random_split``: 50/25/25 of the
    labelled nodes by default, seeded with ``split``). Nodes labelled ``-1`` are in no split. ``num_splits``
    says how many fixed splits there are (``benchmarks/reproduce.py --splits`` runs each). ``undirected``
    (default) adds every reverse edge, as most heterophily benchmarks do; ``False`` keeps the graph as given.
    ``metric``: ROC-AUC for Minesweeper, Tolokers and Questions (as Platonov et al. report them), accuracy
    otherwise.
    """

    def __init__(self, dataset: str, name: Optional[str] = None, split: int = 0, root: Optional[str] = None,
                 undirected: bool = True, random_fractions: Tuple[float, float] = (0.5, 0.25)) -> None:
        dataset_class = getattr(torch_geometric.datasets, dataset, None)
        if not isinstance(dataset_class, type):
            raise ValueError(f"torch_geometric.datasets has no dataset class {dataset!r} (e.g. HeterophilousGraphDataset, "
                             f"WebKB, Actor, WikipediaNetwork, LINKXDataset, Amazon, Coauthor)")
        takes_name = "name" in inspect.signature(dataset_class.__init__).parameters
        if takes_name and name is None:
            raise ValueError(f"{dataset} needs a dataset name (data.init_args.name)")
        if split < 0:
            raise ValueError(f"split must be >= 0, got {split}")
        super().__init__(root=root)
        self.dataset, self.name, self.split, self.undirected = dataset, name if takes_name else None, split, undirected
        self.random_fractions = tuple(random_fractions)
        self._class, self._num_splits = dataset_class, None

    @property
    def folder(self) -> Path:
        return self.root / FOLDERS.get(self.dataset, self.dataset.lower())

    def prepare_data(self) -> None:
        self._load_pyg()

    def _load_pyg(self):
        kwargs = {"name": self.name} if self.name is not None else {}
        try:
            return load_pyg_dataset(self._class, self.folder, **kwargs)
        except AssertionError:  # PyG's classes assert a known name (HeterophilousGraphDataset, WebKB, ...)
            known = _asserted_names(self._class)
            close = difflib.get_close_matches(str(self.name).lower(), known, n=1)
            raise ValueError(f"{self.dataset} has no dataset named {self.name!r}"
                             + (f" (did you mean {close[0]!r}?)" if close else "")
                             + (f"; it knows {', '.join(known)}" if known else "; see its PyG documentation for the names")
                             ) from None
        except DAMAGED_FILE_ERRORS as error:
            raise damaged_raw_files(f"{self.dataset}{'(' + self.name + ')' if self.name else ''}", self.folder,
                                    error) from error
        except (OSError, RuntimeError) as error:
            raise DatasetNotFoundError(
                f"{self.dataset}{'(' + self.name + ')' if self.name else ''} is not under {self.folder} and could not "
                f"be downloaded ({error}); copy its raw files there (as PyG lays them out) or set data.root / "
                f"$DIFFORMER_DATA") from error

    @property
    def metric(self) -> str:
        return "rocauc" if (self.dataset, (self.name or "").lower()) in ROC_AUC else "accuracy"

    @property
    def num_splits(self) -> int:
        """How many fixed splits the dataset has (1 with the random split, any ``split`` then works)."""
        self.data  # noqa: B018
        return self._num_splits

    def load(self) -> Data:
        data = self._load_pyg()[0]
        y = data.y.long() if data.y.dim() == 1 else data.y
        masks = {f"{s}_mask": data.get(f"{s}_mask") for s in SPLITS}
        if any(mask is None for mask in masks.values()):
            self._num_splits = 1
            masks = random_split(y, self.split, *self.random_fractions)
        else:
            self._num_splits = masks["train_mask"].size(1) if masks["train_mask"].dim() == 2 else 1
            if self.split >= self._num_splits:
                raise ValueError(f"{self.dataset}{'/' + self.name if self.name else ''} has {self._num_splits} "
                                 f"split{'s' if self._num_splits > 1 else ''}: split must be in "
                                 f"[0, {self._num_splits - 1}], got {self.split}")
            if masks["train_mask"].dim() == 2:
                masks = {key: mask[:, self.split] for key, mask in masks.items()}
            if y.dim() == 1:  # an unlabelled node (-1) belongs in no split
                masks = {key: mask & (y >= 0) for key, mask in masks.items()}
        edge_index = to_undirected(data.edge_index, num_nodes=data.num_nodes) if self.undirected else data.edge_index
        return Data(x=data.x.float(), y=y, edge_index=edge_index, **masks)

    def describe(self) -> Dict[str, object]:
        described = super().describe()
        described["dataset"] = f"{self.dataset}:{self.name}:split{self.split}"
        return described

    def write_store(self, path, overwrite: bool = False) -> Path:
        """This dataset (its split ``split``) as a graph store, to train by random partition:
        ``RandomPartitionDataModule(store=path, batch_size=...)``."""
        from .store import write_store_from_data

        return write_store_from_data(self.data, path, num_classes=self.num_classes, overwrite=overwrite)
