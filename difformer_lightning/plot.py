"""Training curves and per-layer diffusion energy from a run's CSV logs, as PNG files.

    python -m difformer_lightning.plot runs/synthetic [--out DIR]

Reads every ``metrics.csv`` under the folder (a resumed run writes a new ``version_N``; later
versions replace the steps they repeat) and writes ``curves.png`` (loss and the train / val /
test metric per epoch) and, when ``callbacks.Energy`` logged, ``energy.png`` (each layer's
local, global and total energy over the epochs, and per layer at the last epoch).
"""
import argparse
import csv
import re
from pathlib import Path
from typing import Dict, List

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402

from .io import atomic_file  # noqa: E402


def read_metrics(log_dir: Path) -> Dict[str, Dict[int, float]]:
    """``{metric: {epoch: value}}`` over the fit's ``metrics.csv`` files under ``log_dir``, oldest version first.
    Logs of ``validate``/``test``/``predict`` are left out (``train.py`` writes them under ``<run>/eval``; an
    earlier version wrote them beside the fit's: a file with no ``train/`` or ``val/`` column is one), so a
    curve shows the fit's epochs only."""
    files = sorted((path for path in Path(log_dir).rglob("metrics.csv")
                    if "eval" not in path.relative_to(log_dir).parts),
                   key=lambda p: (p.stat().st_mtime, str(p)))
    if not files:
        raise FileNotFoundError(f"no metrics.csv under {log_dir}: point at a run folder (e.g. runs/synthetic) "
                                "trained with the CSV logger (train.py's default)")
    metrics: Dict[str, Dict[int, float]] = {}
    for path in files:
        with open(path) as file:
            reader = csv.DictReader(file)
            if not any(name.startswith(("train/", "val/")) for name in reader.fieldnames or ()):
                continue  # an evaluation's log
            for row in reader:
                epoch = int(row["epoch"])
                for key, value in row.items():
                    if key not in ("epoch", "step") and value:
                        metrics.setdefault(key, {})[epoch] = float(value)
    return metrics


def _series(metrics: Dict[str, Dict[int, float]], key: str):
    points = sorted(metrics[key].items())
    return [epoch for epoch, _ in points], [value for _, value in points]


def plot_curves(metrics: Dict[str, Dict[int, float]], out: Path) -> Path:
    figure, (loss_axis, metric_axis) = plt.subplots(1, 2, figsize=(10, 4))
    if "train/loss" in metrics:
        loss_axis.plot(*_series(metrics, "train/loss"), label="train/loss")
    loss_axis.set(xlabel="epoch", ylabel="loss", title="training loss")
    for key in sorted(metrics):
        if re.fullmatch(r"(train|val|test)/(acc|rocauc|mse)", key):
            metric_axis.plot(*_series(metrics, key), label=key)
    metric_axis.set(xlabel="epoch", title="metric per split")
    for axis in (loss_axis, metric_axis):
        if axis.get_legend_handles_labels()[0]:
            axis.legend()
    return _save(figure, out / "curves.png")


def plot_energy(metrics: Dict[str, Dict[int, float]], out: Path) -> Path:
    layers = sorted(int(key.rsplit("_", 1)[1]) for key in metrics if key.startswith("energy/total_"))
    figure, (time_axis, layer_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for layer in layers:
        time_axis.plot(*_series(metrics, f"energy/total_{layer}"), label=f"layer {layer}")
    time_axis.set(xlabel="epoch", ylabel="energy per node", title="total energy of each layer's states")
    time_axis.legend()
    last = max(max(metrics[f"energy/total_{layer}"]) for layer in layers)
    for term in ("local", "global", "total"):
        values: List[float] = [metrics[f"energy/{term}_{layer}"].get(last, float("nan")) for layer in layers]
        layer_axis.plot(layers, values, marker="o", label=term)
    layer_axis.set(xlabel="layer k", title=f"energy terms per layer, epoch {last}", xticks=layers)
    layer_axis.legend()
    return _save(figure, out / "energy.png")


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    with atomic_file(path) as handle:
        figure.savefig(handle, dpi=100, format="png")
    plt.close(figure)
    return path


def main(argv=None) -> List[Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("log_dir", type=Path, help="a run folder, e.g. runs/synthetic")
    parser.add_argument("--out", type=Path, help="where the PNG files go (default: the log folder)")
    args = parser.parse_args(argv)
    metrics = read_metrics(args.log_dir)
    out = args.out or args.log_dir
    out.mkdir(parents=True, exist_ok=True)
    written = [plot_curves(metrics, out)]
    if any(key.startswith("energy/total_") for key in metrics):
        written.append(plot_energy(metrics, out))
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    main()
