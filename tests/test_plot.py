"""The plotting command on hand-made logs of an interrupted and resumed run."""
import os

import pytest

from difformer_lightning.plot import main, read_metrics

HEADER = "epoch,step,train/loss,val/acc,energy/local_1,energy/global_1,energy/total_1,energy/global_0\n"


@pytest.mark.slow
def test_plot_merges_resumed_logs_and_writes_both_figures(tmp_path):
    first, second = tmp_path / "logs" / "version_0", tmp_path / "logs" / "version_1"
    for folder in (first, second):
        folder.mkdir(parents=True)
    (first / "metrics.csv").write_text(HEADER + "0,1,1.5,0.4,2.0,2.5,4.5,2.9\n1,3,1.2,0.5,1.0,2.4,3.4,2.9\n")
    (second / "metrics.csv").write_text(HEADER + "1,3,1.1,0.55,1.0,2.4,3.4,2.9\n2,5,0.9,0.6,0.5,2.3,2.8,2.9\n")
    os.utime(first / "metrics.csv", (1, 1))  # the resumed run's log is the newer one
    metrics = read_metrics(tmp_path)
    assert metrics["train/loss"] == {0: 1.5, 1: 1.1, 2: 0.9}  # epoch 1 from the resumed run
    written = main([str(tmp_path), "--out", str(tmp_path / "png")])
    assert [path.name for path in written] == ["curves.png", "energy.png"]
    assert all(path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for path in written)


@pytest.mark.slow
def test_plot_without_logs_says_where_it_looked(tmp_path):
    with pytest.raises(FileNotFoundError, match="no metrics.csv under"):
        main([str(tmp_path)])


def test_plot_shows_the_fit_only_not_a_later_evaluation(tmp_path):
    fit = tmp_path / "logs" / "version_0"
    fit.mkdir(parents=True)
    (fit / "metrics.csv").write_text("epoch,step,train/loss,val/acc,test/acc\n0,1,1.5,0.4,0.181\n1,2,1.2,0.5,0.3\n")
    for evaluation in (tmp_path / "eval" / "test" / "version_0", tmp_path / "logs" / "version_1"):  # new, old layout
        evaluation.mkdir(parents=True)
        (evaluation / "metrics.csv").write_text("epoch,step,test/acc\n0,0,0.845\n")
    assert read_metrics(tmp_path)["test/acc"] == {0: 0.181, 1: 0.3}
