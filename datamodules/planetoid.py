"""Cora, CiteSeer and PubMed with the reference's protocol."""
from pathlib import Path
from typing import Literal, Optional

from torch_geometric.data import Data
from torch_geometric.datasets import Planetoid
from torch_geometric.transforms import NormalizeFeatures
from torch_geometric.utils import remove_self_loops, to_undirected

from difformer_lightning.contracts import SPLITS

from .base import DAMAGED_FILE_ERRORS, DatasetNotFoundError, NodeDataModule, damaged_raw_files
from .prepare import load_pyg_dataset
from .splits import class_balanced_split

# (features, classes) of each dataset, so the model can be built before any download.
PLANETOID_SHAPES = {"Cora": (1433, 7), "CiteSeer": (3703, 6), "PubMed": (500, 3)}


class PlanetoidDataModule(NodeDataModule):
    """A Planetoid citation graph, full batch.

    ``split='reference'`` (default) is the DIFFormer protocol: ``train_per_class``
    labelled nodes per class for training, 500 for validation and 1000 for test, drawn
    with ``split_seed`` 123 and shared by all runs. ``split='public'`` is Planetoid's
    fixed split. Features are row-normalised; the graph is made undirected and its self
    loops removed (the model adds one per node). Files are read from
    ``ROOT/planetoid/<name>/raw`` and downloaded there when missing.
    """

    def __init__(self, name: Literal["Cora", "CiteSeer", "PubMed"] = "Cora",
                 split: Literal["reference", "public"] = "reference", train_per_class: int = 20,
                 num_val: int = 500, num_test: int = 1000, split_seed: int = 123, root: Optional[str] = None) -> None:
        if name not in PLANETOID_SHAPES:
            raise ValueError(f"unknown Planetoid dataset {name!r}: choose one of {', '.join(PLANETOID_SHAPES)}")
        if split not in ("reference", "public"):
            raise ValueError(f"unknown split {split!r}: choose 'reference' or 'public'")
        super().__init__(num_classes=PLANETOID_SHAPES[name][1], root=root)
        self.name, self.split = name, split
        self.train_per_class, self.num_val, self.num_test, self.split_seed = train_per_class, num_val, num_test, split_seed

    @property
    def num_features(self) -> int:
        return PLANETOID_SHAPES[self.name][0]

    def prepare_data(self) -> None:
        self._dataset()

    @property
    def folder(self) -> Path:
        """``<root>/planetoid`` (the layout every data module shares: one root serves every preset), or
        ``<root>`` itself where an older layout put ``<root>/<name>/raw`` there."""
        if (self.root / self.name / "raw").is_dir() and not (self.root / "planetoid").is_dir():
            return self.root
        return self.root / "planetoid"

    def _dataset(self) -> Planetoid:
        try:
            return load_pyg_dataset(Planetoid, self.folder, name=self.name, transform=NormalizeFeatures())
        except DAMAGED_FILE_ERRORS as error:
            raise damaged_raw_files(self.name, self.folder / self.name / "raw", error) from error
        except OSError as error:
            raise DatasetNotFoundError(
                f"{self.name} is not under {self.folder / self.name / 'raw'} and could not be downloaded ({error}). "
                f"Copy the Planetoid raw files (ind.{self.name.lower()}.x, ...) there, or point data.root or "
                f"$DIFFORMER_DATA at a folder that has planetoid/<name>/raw.") from error

    def load(self) -> Data:
        data = self._dataset()[0]
        edge_index, _ = remove_self_loops(to_undirected(data.edge_index, num_nodes=data.num_nodes))
        masks = {f"{s}_mask": data[f"{s}_mask"] for s in SPLITS}
        if self.split == "reference":
            masks = class_balanced_split(data.y, self.train_per_class, self.num_val, self.num_test, self.split_seed)
        return Data(x=data.x, y=data.y, edge_index=edge_index, **masks)
