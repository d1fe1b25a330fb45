"""DIFFormer for PyTorch Lightning: the encoder and the LightningModules that train it."""
from .attention import edge_attention, linear_attention, sigmoid_attention
from .conv import DIFFormerConv
from .graph import NormalizedGraph
from .model import DIFFormer
from .node_classifier import NodeClassifier

__all__ = ["DIFFormer", "DIFFormerConv", "NodeClassifier", "NormalizedGraph", "linear_attention", "sigmoid_attention",
           "edge_attention"]
