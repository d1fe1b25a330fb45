"""Spatio-temporal data and the regression module, against hand-made series and the reference's formulas."""
import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, data_folder, data_root
from lightning.pytorch.callbacks import EarlyStopping

from datamodules import TemporalDataModule
from datamodules.temporal import chronological_split, snapshots_from_json
from difformer_lightning import DIFFormer, NodeRegressor, all_pairs_mse

STATIC = {"edges": [[0, 1], [1, 0], [1, 2], [2, 1]], "FX": [[float(10 * t + n) for n in range(3)] for t in range(7)]}


def test_static_series_gives_lagged_features_and_next_value_targets():
    snapshots = snapshots_from_json(STATIC, lags=2)
    assert len(snapshots) == 5
    assert snapshots[0].x.tolist() == [[0.0, 10.0], [1.0, 11.0], [2.0, 12.0]]  # node n: values at t=0, 1
    assert snapshots[0].y.tolist() == [20.0, 21.0, 22.0]
    assert snapshots[4].y.tolist() == [60.0, 61.0, 62.0]
    assert snapshots[0].edge_index.tolist() == [[0, 1, 1, 2], [1, 0, 2, 1]]
    assert snapshots[0].edge_weight.tolist() == [1.0] * 4
    split = chronological_split(snapshots * 2)  # 10 snapshots: 2 / 2 / 6, in time order
    assert [len(split[s]) for s in ("train", "val", "test")] == [2, 2, 6]


def test_daily_graphs_and_per_node_zscores_like_pyg_temporal():
    raw = {"time_periods": 4, "y": [[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [4.0, 40.0]],
           "edge_mapping": {"edge_index": {str(t): [[0, 1]] * (t + 1) for t in range(4)},
                            "edge_weight": {str(t): [float(t)] * (t + 1) for t in range(4)}}}
    snapshots = snapshots_from_json(raw, lags=1)
    values = np.array(raw["y"])  # EnglandCovidDatasetLoader._get_targets_and_features, as written there
    z = torch.tensor((values - np.mean(values, axis=0)) / (np.std(values, axis=0) + 10 ** -10), dtype=torch.float32)
    assert torch.allclose(snapshots[1].x.squeeze(1), z[1]) and torch.allclose(snapshots[1].y, z[2])
    assert snapshots[2].edge_index.size(1) == 3 and snapshots[2].edge_weight.tolist() == [2.0] * 3


def test_bad_temporal_files_are_named():
    with pytest.raises(ValueError, match="key 'FX' is missing"):
        snapshots_from_json({"edges": STATIC["edges"]}, lags=2, source="x.json")
    with pytest.raises(ValueError, match="lags must be in \\[1, 6\\] \\(the series has 7 time steps\\), got 7"):
        snapshots_from_json(STATIC, lags=7)
    with pytest.raises(ValueError, match="key 'edge_weight' is missing"):
        snapshots_from_json({"time_periods": 1, "y": [[1.0]], "edge_mapping": {"edge_index": {}}}, lags=1)


def test_all_pairs_error_is_the_reference_broadcast():
    generator = torch.Generator().manual_seed(0)
    prediction, target = torch.randn(12, generator=generator), torch.randn(12, generator=generator)
    batch = torch.tensor([0] * 5 + [1] * 7)
    with warnings.catch_warnings():  # the reference's [N, 1] vs [N] broadcast, as it computed it
        warnings.simplefilter("ignore")
        expected = [F.mse_loss(prediction[batch == g].unsqueeze(1), target[batch == g]) for g in (0, 1)]
    torch.testing.assert_close(all_pairs_mse(prediction, target, batch), torch.stack(expected))


@pytest.mark.slow
def test_chickenpox_trains_below_the_variance_in_batches_of_snapshots():
    import lightning.pytorch as pl
    source = data_folder("temporal") / "chickenpox.json"
    datamodule = TemporalDataModule("chickenpox", root=str(data_root("temporal")), snapshots_per_batch=8)  # reads only
    torch.manual_seed(0)
    module = NodeRegressor(DIFFormer(4, 4, 1, num_layers=2, use_graph=True), lr=1e-2)
    trainer = pl.Trainer(max_epochs=15, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(module, datamodule)
    test_variance = torch.cat([s.y for s in datamodule.splits["test"]]).var().item()
    assert float(module.test_at_best_val) < test_variance  # better than predicting the mean
    assert len(trainer.train_dataloader) == 13  # 103 training snapshots, 8 per optimiser step
    raw = json.loads(source.read_text())
    assert len(raw["FX"]) - 4 == sum(len(v) for v in datamodule.splits.values())


QUIET = ["--trainer.logger", "false", "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false"]


@pytest.mark.parametrize("preset, kernel, use_graph", [("chickenpox_s", "simple", False),
                                                       ("chickenpox_s_graph", "simple", True),
                                                       ("chickenpox_a", "sigmoid", False),
                                                       ("chickenpox_a_graph", "sigmoid", True)])
@pytest.mark.slow
def test_presets_train_the_reference_recipe_through_the_cli(preset, kernel, use_graph, tmp_path):
    from train import main
    cli = main(["fit", "--config", str(ROOT / "configs" / f"{preset}.yaml"), "--data.init_args.root", str(data_root("temporal")),
                "--trainer.max_epochs", "20", "--trainer.default_root_dir", str(tmp_path), *QUIET], save_config_callback=None)
    model = cli.config.fit.model.init_args
    encoder = model.encoder.init_args
    assert isinstance(cli.model, NodeRegressor)
    assert (encoder.kernel, encoder.use_graph) == (kernel, use_graph)
    # the reference's recipe; sizes linked from the data: 4 lags in, one value out
    built = cli.model.encoder
    assert (built.lin_in.in_features, built.lin_out.out_features, encoder.hidden_channels, len(built.convs)) == (4, 1, 4, 2)
    assert (model.lr, model.weight_decay) == (1e-2, 5e-4)
    stopping = [c for c in cli.trainer.callbacks if isinstance(c, EarlyStopping)]
    assert [(c.monitor, c.patience, c.mode) for c in stopping] == [("val/mse", 20, "min")]
    test_variance = torch.cat([s.y for s in cli.datamodule.splits["test"]]).var().item()
    assert float(cli.model.test_at_best_val) < test_variance


@pytest.mark.parametrize("args, message", [
    (["--config", "configs/chickenpox_s.yaml", "--model", "difformer_lightning.NodeClassifier"],
     "TemporalDataModule is a regression task but the model is difformer_lightning.NodeClassifier: "
     "use --model difformer_lightning.NodeRegressor"),
    (["--config", "configs/synthetic.yaml", "--model", "difformer_lightning.NodeRegressor"],
     "is a classification task but the model is difformer_lightning.NodeRegressor: "
     "use --model difformer_lightning.NodeClassifier"),
])
@pytest.mark.slow
def test_cli_refuses_a_model_that_does_not_fit_the_task_before_loading_data(args, message, tmp_path):
    from train import main
    with pytest.raises(ValueError, match=message):
        main(["fit", *args, "--data.init_args.root", str(tmp_path / "nothing here"),
              "--trainer.default_root_dir", str(tmp_path), *QUIET],
             save_config_callback=None)


def chickenpox_fit(run_dir):
    """train.py options of a chickenpox_s fit that checkpoints into ``run_dir`` (no logger, no progress bar)."""
    return ["--config", str(ROOT / "configs" / "chickenpox_s.yaml"), "--data.init_args.root", str(data_root("temporal")),
            "--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir",
            str(run_dir)]


@pytest.mark.slow
def test_a_temporal_checkpoint_resumed_on_other_temporal_data_lists_the_differences(tmp_path):
    from train import main
    common = chickenpox_fit(tmp_path)
    main(["fit", *common, "--trainer.max_epochs", "2"], save_config_callback=None)
    checkpoint = tmp_path / "checkpoints" / "last.ckpt"
    assert checkpoint.is_file()
    with pytest.raises(ValueError) as error:
        main(["fit", *common, "--trainer.max_epochs", "3", "--data.init_args.name", "england_covid",
              "--data.init_args.lags", "4", "--ckpt_path", str(checkpoint)], save_config_callback=None)
    message = str(error.value)
    assert "data.dataset: checkpoint 'TemporalDataModule:chickenpox', this run 'TemporalDataModule:england_covid'" \
        in message
    assert "data.num_nodes: checkpoint 20, this run 129" in message


# ---- the reference's protocol (qitianwu/DIFFormer spatial-temporal/main.py, run.sh) and the standard one ----

def pyg_temporal_split(count: int, train_ratio: float):
    """PyTorch Geometric Temporal's temporal_signal_split, as its source writes it:
    ``train_snapshots = int(train_ratio * data_iterator.snapshot_count)``; returns (train, rest) counts."""
    first = int(train_ratio * count)
    return first, count - first


@pytest.mark.parametrize("count", [10, 53, 61, 517, 1000, 731])
def test_split_boundaries_are_pyg_temporals_applied_twice_as_the_reference(count):
    snapshots = [None] * count
    split = chronological_split(snapshots)
    # main.py: temporal_signal_split(dataset, 0.2), then on the rest with val_ratio / (1 - train_ratio)
    train, rest = pyg_temporal_split(count, 0.2)
    val, test = pyg_temporal_split(rest, 0.2 / (1 - 0.2))
    assert [len(split[s]) for s in ("train", "val", "test")] == [train, val, test]


def test_england_covid_and_chickenpox_split_as_the_reference():
    root = str(data_root("temporal"))
    covid = TemporalDataModule("england_covid", root=root)
    assert [len(covid.splits[s]) for s in ("train", "val", "test")] == [10, 10, 33]  # not 10 / 11 / 32
    chickenpox = TemporalDataModule("chickenpox", root=root)
    assert [len(chickenpox.splits[s]) for s in ("train", "val", "test")] == [103, 103, 311]
    assert chickenpox.describe()["split"] == [103, 103, 311]


def _two_snapshots(seed=0, nodes=(5, 5)):
    from torch_geometric.data import Batch, Data
    generator = torch.Generator().manual_seed(seed)
    graphs = []
    for n in nodes:
        edge_index = torch.stack([torch.arange(n), (torch.arange(n) + 1) % n])
        graphs.append(Data(x=torch.randn(n, 4, generator=generator), y=torch.randn(n, generator=generator),
                           edge_index=edge_index, edge_weight=torch.rand(n, generator=generator) + 0.5))
    return graphs, Batch.from_data_list(graphs)


@pytest.mark.parametrize("objective", ["mse", "mse_all_pairs"])
@pytest.mark.slow
def test_one_step_on_all_training_snapshots_has_the_reference_gradient(objective):
    """main.py (chickenpox, covid): cost_tr = sum over snapshots of torch.mean((y_hat - y) ** 2) with y_hat [N, 1]
    and y [N] (broadcast), divided by the count, one backward and one Adam step an epoch."""
    graphs, batch = _two_snapshots()
    torch.manual_seed(0)
    module = NodeRegressor(DIFFormer(4, 4, 1, num_layers=2, use_graph=True, use_weight=False, dropout=0.0),
                           objective=objective)
    module.train()
    loss = module.training_step(batch, 0)
    ours = torch.autograd.grad(loss, list(module.parameters()))
    reference = 0
    for graph in graphs:
        y_hat = module.encoder(graph.x, graph.edge_index, graph.edge_weight)  # [N, 1]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the broadcast warning the reference ignores
            target = graph.y if objective == "mse_all_pairs" else graph.y.unsqueeze(1)
            reference = reference + torch.mean((y_hat - target) ** 2)
    reference = reference / len(graphs)
    torch.testing.assert_close(loss, reference)
    for mine, theirs in zip(ours, torch.autograd.grad(reference, list(module.parameters()))):
        torch.testing.assert_close(mine, theirs)


def test_snapshots_per_batch_all_gives_one_step_an_epoch():
    datamodule = TemporalDataModule("england_covid", root=str(data_root("temporal")), snapshots_per_batch="all")
    assert len(datamodule.train_dataloader()) == 1
    assert next(iter(datamodule.train_dataloader())).num_graphs == 10
    with pytest.raises(ValueError, match="snapshots_per_batch must be an integer >= 1 or 'all'"):
        TemporalDataModule("chickenpox", snapshots_per_batch=0)


def reference_stop_epoch(values, patience):
    """main.py's loop: a counter of non-improving epochs that is never reset; returns the last epoch run."""
    best, no_improve = float("inf"), 0
    for epoch, value in enumerate(values):
        if value < best:
            best = value
        else:
            no_improve += 1
            if no_improve >= patience:
                return epoch
    return len(values) - 1


class _Scripted(__import__("lightning.pytorch", fromlist=["LightningModule"]).LightningModule):
    """Logs a given validation value per epoch and learns nothing."""

    def __init__(self, values):
        super().__init__()
        self.values, self.weight = values, torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        return (self.weight * batch[0]).sum()

    def validation_step(self, batch, batch_idx):
        self.log("val/cost", float(self.values[self.current_epoch]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(1, 1)))

    val_dataloader = train_dataloader


@pytest.mark.slow
def test_cumulative_stopping_stops_where_the_reference_does_and_consecutive_patience_does_not():
    import lightning.pytorch as pl
    from callbacks import CumulativeEarlyStopping
    # misses every other epoch, then improves every epoch: never 3 misses in a row, 3 in total by epoch 5
    values = [10.0, 11.0, 9.0, 12.0, 8.0, 13.0, 7.0, 14.0, 6.0] + [5.0 - 0.1 * k for k in range(21)]
    expected = reference_stop_epoch(values, patience=3)
    assert expected == 5  # misses at epochs 1, 3, 5

    def fit(callback):
        trainer = pl.Trainer(max_epochs=len(values), callbacks=[callback], logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
        trainer.fit(_Scripted(values))
        return trainer.current_epoch - 1  # the last epoch run

    stopping = CumulativeEarlyStopping("val/cost", patience=3)
    assert fit(stopping) == expected
    assert (stopping.best, stopping.non_improving) == (8.0, 3)
    assert fit(EarlyStopping("val/cost", patience=3)) == len(values) - 1  # never 3 misses in a row
    restored = CumulativeEarlyStopping("val/cost", patience=3)
    restored.load_state_dict(stopping.state_dict())
    assert (restored.best, restored.non_improving) == (8.0, 3)
    with pytest.raises(ValueError, match="monitors 'val/missing', which was not logged; logged: val/cost"):
        fit(CumulativeEarlyStopping("val/missing", patience=3))


def test_trivial_forecasts_by_hand():
    from difformer_lightning import trivial_forecasts
    x = torch.tensor([[1.0, 2.0], [3.0, 6.0], [5.0, 10.0]])  # lags, oldest first; nodes 0, 1 | 2
    batch = torch.tensor([0, 0, 1])
    forecasts = trivial_forecasts(x, batch)
    assert forecasts["zero"].tolist() == [0.0, 0.0, 0.0]
    assert forecasts["previous_mean"].tolist() == [4.0, 4.0, 10.0]
    assert forecasts["last_value"].tolist() == [2.0, 6.0, 10.0]
    assert forecasts["lag_mean"].tolist() == [1.5, 4.5, 7.5]


def test_edge_weight_transforms_and_covids_raw_weights_drown_the_attention():
    from datamodules.temporal import transform_edge_weights
    root = str(data_root("temporal"))
    raw = TemporalDataModule("england_covid", root=root).splits["train"][0]
    logged = TemporalDataModule("england_covid", root=root, edge_weight_transform="log1p").splits["train"][0]
    scaled = TemporalDataModule("england_covid", root=root, edge_weight_transform="max").splits["train"][0]
    torch.testing.assert_close(logged.edge_weight, torch.log1p(raw.edge_weight))
    torch.testing.assert_close(scaled.edge_weight, raw.edge_weight / raw.edge_weight.max())
    assert float(raw.edge_weight.max()) > 1e5 and float(scaled.edge_weight.max()) == 1.0
    with pytest.raises(ValueError, match="edge_weight_transform must be 'none', 'log1p' or 'max', got 'sqrt'"):
        transform_edge_weights([raw], "sqrt")
    torch.manual_seed(0)
    model = DIFFormer(8, 4, 1, num_layers=2, use_graph=True, use_weight=False).eval()
    ratios = {name: model.graph_term_ratios(s.x, s.edge_index, s.edge_weight)
              for name, s in (("none", raw), ("log1p", logged), ("max", scaled))}
    assert ratios["none"][0] > 1000 and ratios["log1p"][0] < ratios["none"][0] / 100


def test_graph_term_ratio_is_the_graph_terms_share_of_the_layer_output():
    """Against two forward passes: the layer with the graph term minus the same layer without it is the
    graph term (a plain sum, graph_weight -1); float64."""
    from difformer_lightning import DIFFormerConv
    graphs, batch = _two_snapshots(nodes=(6, 9))
    for kernel in ("simple", "sigmoid"):
        torch.manual_seed(0)
        model = DIFFormer(4, 5, 1, num_layers=1, kernel=kernel, use_graph=True).double().eval()
        alone = DIFFormerConv(5, 5, 1, kernel, use_graph=False).double()
        alone.load_state_dict(model.convs[0].state_dict())
        from difformer_lightning.graph import NormalizedGraph
        x = batch.x.double()
        h = model.encode(x)
        graph = NormalizedGraph.build(batch.edge_index, batch.edge_weight.double(), x.size(0), torch.float64)
        with torch.no_grad():
            both, attention = model.convs[0](h, graph, batch.batch), alone(h, None, batch.batch)
        expected = float((both - attention).norm() / attention.norm())
        ratio, = model.graph_term_ratios(x, batch.edge_index, batch.edge_weight.double(), batch.batch)
        assert ratio == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match="does not have both"):
        DIFFormer(4, 5, 1, use_graph=False).graph_term_ratios(x.float(), batch.edge_index)


# run.sh of qitianwu/DIFFormer, spatial-temporal: (lr, weight_decay, dropout) per configuration
RUN_SH = {("chickenpox", "s_graph"): (0.01, 0.0, 0.2), ("chickenpox", "s"): (0.01, 0.0, 0.2),
          ("chickenpox", "a_graph"): (0.005, 0.0, 0.2), ("chickenpox", "a"): (0.01, 0.005, 0.2),
          ("england_covid", "s_graph"): (0.01, 0.0, 0.2), ("england_covid", "s"): (0.01, 0.005, 0.2),
          ("england_covid", "a_graph"): (0.01, 0.005, 0.5), ("england_covid", "a"): (0.005, 0.005, 0.2)}


@pytest.mark.parametrize("dataset, variant", list(RUN_SH))
@pytest.mark.slow
def test_reference_presets_hold_run_sh_and_the_protocol(dataset, variant, tmp_path):
    from callbacks import CumulativeEarlyStopping
    from train import main
    cli = main(["fit", "--config", str(ROOT / "configs" / "reference" / f"{dataset}_{variant}.yaml"),
                "--data.init_args.root", str(data_root("temporal")), "--trainer.max_epochs", "2",
                "--trainer.default_root_dir", str(tmp_path), *QUIET], save_config_callback=None)
    model, encoder = cli.model, cli.model.encoder
    conv = encoder.convs[0]
    assert (model.hparams.lr, model.hparams.weight_decay, encoder.dropout) == RUN_SH[(dataset, variant)]
    assert (conv.kernel.name, conv.use_graph, conv.use_weight, conv.num_heads, encoder.alpha, len(encoder.convs),
            encoder.hidden_channels) == ("simple" if variant[0] == "s" else "sigmoid", variant.endswith("graph"),
                                         False, 1, 0.5, 2, 4)
    assert model.objective == "mse_all_pairs" and len(cli.trainer.train_dataloader) == 1
    assert cli.datamodule.edge_weight_transform == "none"
    stopping = [c for c in cli.trainer.callbacks if isinstance(c, CumulativeEarlyStopping)]
    assert [(c.monitor, c.patience) for c in stopping] == [("val/mse_all_pairs", 20)]
    assert not [c for c in cli.trainer.callbacks if isinstance(c, EarlyStopping)]


@pytest.mark.slow
def test_a_checkpoint_from_before_the_objective_option_still_resumes(tmp_path):
    from train import main
    common = chickenpox_fit(tmp_path)
    main(["fit", *common, "--trainer.max_epochs", "1"], save_config_callback=None)
    path = tmp_path / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(path, weights_only=False)
    del checkpoint["hyper_parameters"]["objective"]  # as 0.1.0 wrote it
    torch.save(checkpoint, path)
    cli = main(["fit", *common, "--trainer.max_epochs", "2", "--ckpt_path", str(path)], save_config_callback=None)
    assert cli.trainer.current_epoch == 2 and cli.model.objective == "mse"
    # (EarlyStopping in the standard presets checks after validation: with Lightning's default check at the
    # train epoch's end, this resume stopped with "val/mse which is not available")


def test_a_ragged_row_and_a_constant_series_are_named():
    ragged = {"edges": STATIC["edges"], "FX": [row[:] for row in STATIC["FX"]]}
    ragged["FX"][3] = ragged["FX"][3][:2]
    with pytest.raises(ValueError, match="x.json: 'FX' row 3 \\(time step 3\\) has 2 values where row 0 has 3"):
        snapshots_from_json(ragged, lags=2, source="x.json")
    constant = {"edges": [[0, 1]], "weights": [1.0], "time_periods": 4,
                **{str(t): {"y": [float(t), 5.0]} for t in range(4)}}  # node 1 stays 5.0
    with pytest.raises(ValueError, match="w.json: node 1's series is constant \\(5.0 at every time step; 1 such nodes\\)"):
        snapshots_from_json(constant, lags=1, source="w.json")


@pytest.mark.slow
def test_stopping_on_another_metric_than_the_selection_is_warned(tmp_path):
    from train import main
    with pytest.warns(UserWarning, match="CumulativeEarlyStopping monitors val/mse_all_pairs but the model selects its "
                                         "epoch on val/mse"):
        cli = main(["fit", "--config", str(ROOT / "configs" / "reference" / "england_covid_s.yaml"),
                    "--data.init_args.root", str(data_root("temporal")), "--model.init_args.objective", "mse",
                    "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(tmp_path), *QUIET],
                   save_config_callback=None)
    assert cli.model.selection_summary().startswith("best val/mse ") and "reported: test@best_val (per-node MSE)" in \
        cli.model.selection_summary()
