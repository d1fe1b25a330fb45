"""LightningDataModules: full-batch graphs, samples without a graph, Planetoid, a synthetic default, random node partition over a graph store."""
from .base import DATA_ENV, DatasetNotFoundError, GraphDataModule, NodeDataModule, data_root, validate_node_data
from .features import FeatureDataModule, knn_graph
from .linkx import LINKXDataModule
from .ogb import OGBDataModule
from .partition import RandomPartitionDataModule
from .pyg import PyGDataModule
from .planetoid import PlanetoidDataModule
from .splits import class_balanced_split
from .store import GraphStore, StoreError
from .synthetic import SyntheticCSBMDataModule, contextual_sbm
from .temporal import TemporalDataModule

__all__ = ["DATA_ENV", "DatasetNotFoundError", "FeatureDataModule", "GraphDataModule", "LINKXDataModule",
           "NodeDataModule", "GraphStore", "OGBDataModule", "PlanetoidDataModule", "PyGDataModule",
           "RandomPartitionDataModule",
           "StoreError", "SyntheticCSBMDataModule", "TemporalDataModule",
           "class_balanced_split", "contextual_sbm", "data_root", "knn_graph", "validate_node_data"]
