"""The diffusion energy DIFFormer's layers descend, measured on a fixed probe batch."""
from typing import Dict, List

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
import torch
import torch.nn.functional as F
from torch import Tensor

from difformer_lightning.contracts import check_data_module
from difformer_lightning.encoder_module import EncoderModule


def local_energy(state: Tensor, previous: Tensor) -> Tensor:
    r""":math:`\frac{1}{N}\lVert Z_k - Z_{k-1} \rVert_F^2`: how far one step moved the states."""
    return (state - previous).pow(2).sum() / state.size(0)


def pairwise_energy(state: Tensor) -> Tensor:
    r""":math:`\frac{1}{N^2}\sum_{i,j} \delta(\lVert \hat z_i - \hat z_j \rVert^2)` in O(N D^2), for the
    DIFFormer-s diffusivity, on the rows :math:`\hat z_i` of ``state`` scaled to unit length.

    For unit vectors :math:`d_{ij} = \lVert \hat z_i - \hat z_j \rVert^2 = 2 - 2c_{ij}` with
    :math:`c_{ij} = \hat z_i^\top \hat z_j`, and the simple kernel :math:`1 + c_{ij} = 2 - d_{ij}/2`
    is :math:`\delta'(d)` for :math:`\delta(d) = 2d - d^2/4` (concave and non-decreasing on
    [0, 4], as the paper requires). Summing over all pairs,

    .. math::
        \sum_{i,j} \delta(d_{ij}) = 3N^2 - 2\,\lVert \textstyle\sum_i \hat z_i \rVert^2
                                    - \lVert \hat Z^\top \hat Z \rVert_F^2,

    so no N x N matrix is formed. Ranges from 0 (all states parallel) to 3 (the most spread).
    """
    unit = F.normalize(state, dim=-1)
    num_nodes = unit.size(0)
    column_sum = unit.sum(dim=0)
    gram = unit.T @ unit
    return 3.0 - 2.0 * column_sum.dot(column_sum) / num_nodes**2 - gram.pow(2).sum() / num_nodes**2


def diffusion_energy(states: List[Tensor], weight: float = 1.0) -> Dict[str, float]:
    """Per layer ``k >= 1``: ``local_k``, ``global_k`` and ``total_k = local_k + weight * global_k``
    (the energy :math:`E(Z_k) = \\lVert Z_k - Z_{k-1} \\rVert^2 + \\lambda \\sum_{ij}\\delta(\\cdot)`,
    per node and per pair), plus ``global_0`` for the states entering the first layer."""
    values = {"global_0": float(pairwise_energy(states[0]))}
    for k in range(1, len(states)):
        local, pairwise = float(local_energy(states[k], states[k - 1])), float(pairwise_energy(states[k]))
        values.update({f"local_{k}": local, f"global_{k}": pairwise, f"total_{k}": local + weight * pairwise})
    return values


class Energy(pl.Callback):
    """Logs ``energy/local_k``, ``energy/global_k`` and ``energy/total_k`` for every layer ``k``
    every ``every_n_epochs`` training epochs, from an eval-mode float32 forward pass of the
    encoder over a fixed probe batch (``probe_nodes`` nodes, the data module's
    ``probe_batch``), so the curves show whether the layers descend the energy the model is
    derived from. ``weight`` is the paper's :math:`\\lambda`.

    For a model with both an all-pairs term and the graph term (DIFFormer-s/-a with ``use_graph``) it
    also logs ``energy/graph_ratio_k``, the graph term's size over the attention term's in layer ``k``
    (:meth:`~difformer_lightning.DIFFormer.graph_term_ratios`), and reports the ratios at initialisation
    when the fit starts (``initial_graph_ratios``): with raw edge weights of thousands the layers are graph
    diffusions whatever the kernel.
    """

    def __init__(self, every_n_epochs: int = 1, probe_nodes: int = 10_000, weight: float = 1.0) -> None:
        if every_n_epochs < 1 or probe_nodes < 2:
            raise ValueError(f"every_n_epochs must be >= 1 and probe_nodes >= 2, got {every_n_epochs}, {probe_nodes}")
        self.every_n_epochs, self.probe_nodes, self.weight = every_n_epochs, probe_nodes, weight
        self._probe = None
        self.initial_graph_ratios = None

    def setup(self, trainer: "pl.Trainer", module: "pl.LightningModule", stage: str) -> None:
        if trainer.datamodule is None or not isinstance(module, EncoderModule):
            raise ValueError("callbacks.Energy needs a data module (the data contract's probe_batch() gives its "
                             "probe) and a LightningModule around a DIFFormer (NodeClassifier, NodeRegressor)")
        check_data_module(trainer.datamodule)
        self._probe = trainer.datamodule.probe_batch(self.probe_nodes)

    def on_fit_start(self, trainer: "pl.Trainer", module: "pl.LightningModule") -> None:
        if module.encoder.mixes_graph_and_attention:
            self.initial_graph_ratios = self._on_probe(module, lambda encoder, probe: encoder.graph_term_ratios(
                probe.x.float(), probe.edge_index, probe.get("edge_weight"), probe.get("batch")))
            rank_zero_info("graph term / attention term at initialisation, per layer: "
                           + ", ".join(f"{ratio:.3g}" for ratio in self.initial_graph_ratios))

    def on_train_epoch_end(self, trainer: "pl.Trainer", module: "pl.LightningModule") -> None:
        if trainer.current_epoch % self.every_n_epochs:
            return

        def measure(encoder, probe):
            arguments = (probe.x.float(), probe.get("edge_index"), probe.get("edge_weight"), probe.get("batch"))
            ratios = encoder.graph_term_ratios(*arguments) if encoder.mixes_graph_and_attention else []
            return encoder.diffuse(*arguments), ratios

        states, ratios = self._on_probe(module, measure)
        for name, value in diffusion_energy([s.float() for s in states], self.weight).items():
            module.log(f"energy/{name}", value)
        for layer, ratio in enumerate(ratios, start=1):
            module.log(f"energy/graph_ratio_{layer}", ratio)

    def _on_probe(self, module: "pl.LightningModule", function):
        """``function(encoder, probe)`` in eval mode, without gradients, autocast off, on the module's device;
        the module's training mode restored after."""
        probe = self._probe.to(module.device)
        was_training = module.training
        module.eval()
        with torch.no_grad(), torch.autocast(device_type=module.device.type, enabled=False):
            result = function(module.encoder, probe)
        module.train(was_training)
        return result
