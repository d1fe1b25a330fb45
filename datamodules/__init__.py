"""LightningDataModules: full-batch graphs, the Planetoid citation graphs, a synthetic default."""
from .base import DATA_ENV, DatasetNotFoundError, NodeDataModule, data_root, validate_node_data
from .planetoid import PlanetoidDataModule
from .splits import class_balanced_split
from .synthetic import SyntheticCSBMDataModule, contextual_sbm

__all__ = ["DATA_ENV", "DatasetNotFoundError", "NodeDataModule", "PlanetoidDataModule", "SyntheticCSBMDataModule",
           "class_balanced_split", "contextual_sbm", "data_root", "validate_node_data"]
