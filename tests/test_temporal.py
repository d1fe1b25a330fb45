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
def test_cli_refuses_a_model_that_does_not_fit_the_task_before_loading_data(args, message, tmp_path):
    from train import main
    with pytest.raises(ValueError, match=message):
        main(["fit", *args, "--data.init_args.root", str(tmp_path / "nothing here"),
              "--trainer.default_root_dir", str(tmp_path), *QUIET],
             save_config_callback=None)


def test_a_temporal_checkpoint_resumed_on_other_temporal_data_lists_the_differences(tmp_path):
    from train import main
    common = ["--config", str(ROOT / "configs" / "chickenpox_s.yaml"), "--data.init_args.root", str(data_root("temporal")),
              "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
              "--trainer.default_root_dir", str(tmp_path)]
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
