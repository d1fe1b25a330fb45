"""DIFFormer for PyTorch Lightning: the encoder and the LightningModules that train it."""
from .attention import edge_attention, linear_attention, sigmoid_attention
from .conv import DIFFormerConv
from .graph import NormalizedGraph
from .kernels import (KERNELS, DiffusionKernel, GATKernel, GCNKernel, NoDiffusion, SigmoidKernel, SimpleKernel,
                      kernel_class)
from .model import DIFFormer
from .node_classifier import NodeClassifier
from .node_regressor import NodeRegressor, all_pairs_mse, trivial_forecasts

__all__ = ["DIFFormer", "DIFFormerConv", "NodeClassifier", "NodeRegressor", "all_pairs_mse", "trivial_forecasts",
           "NormalizedGraph", "linear_attention", "sigmoid_attention", "edge_attention", "DiffusionKernel", "KERNELS",
           "SimpleKernel", "SigmoidKernel", "GCNKernel", "GATKernel", "NoDiffusion", "kernel_class"]
