"""Callbacks a long DIFFormer run needs beside the model."""
from .checkpoint import Checkpoint
from .early_stopping import CumulativeEarlyStopping
from .energy import Energy, diffusion_energy, local_energy, pairwise_energy
from .memory import Memory, process_memory_mb
from .non_finite import NonFiniteError, NonFiniteGuard
from .partition_stats import PartitionStats
from .predictions import PredictionWriter
from .throughput import Throughput

__all__ = ["Checkpoint", "CumulativeEarlyStopping", "Energy", "Memory", "NonFiniteError", "NonFiniteGuard", "PartitionStats", "PredictionWriter", "Throughput",
           "diffusion_energy", "local_energy", "pairwise_energy", "process_memory_mb"]
