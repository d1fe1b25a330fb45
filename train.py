"""Command line: ``python train.py {fit,validate,test,predict} --config configs/X.yaml``.

A LightningCLI over :class:`NodeClassifier` and any LightningDataModule that exposes
``num_features``, ``num_classes`` and ``multilabel`` (every module in ``datamodules``).
The encoder's input and output sizes and the task come from the data, so a config only
chooses the dataset, the encoder's hyperparameters and the Trainer's options.
"""
from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from difformer_lightning import NodeClassifier


def _task(multilabel: bool) -> str:
    return "multilabel" if multilabel else "multiclass"


class DIFFormerCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.num_features", "model.encoder.init_args.in_channels", apply_on="instantiate")
        parser.link_arguments("data.num_classes", "model.encoder.init_args.out_channels", apply_on="instantiate")
        parser.link_arguments("data.multilabel", "model.task", compute_fn=_task, apply_on="instantiate")

    def after_fit(self) -> None:
        model = self.model
        rank_zero_info(f"best val/{model.metric_name} {float(model.best_val):.4f}, "
                       f"test@best_val {float(model.test_at_best_val):.4f}")


def main(args=None, **kwargs) -> DIFFormerCLI:
    # Runs write under ./runs (logs, checkpoints, the resolved config.yaml), never into the
    # source tree; a rerun overwrites the config it saved rather than refusing to start.
    kwargs.setdefault("trainer_defaults", {"default_root_dir": "runs"})
    kwargs.setdefault("save_config_kwargs", {"overwrite": True})
    return DIFFormerCLI(NodeClassifier, LightningDataModule, subclass_mode_data=True, args=args, **kwargs)


if __name__ == "__main__":
    main()
