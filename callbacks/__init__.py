"""Callbacks a long DIFFormer run needs beside the model."""
from .memory import Memory, process_memory_mb
from .throughput import Throughput

__all__ = ["Memory", "Throughput", "process_memory_mb"]
