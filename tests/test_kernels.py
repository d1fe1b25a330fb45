"""Kernels as types: the built-in ones behind one interface, a user's own kernel from a module outside the
package (trained, evaluated exactly and resumed through train.py), and 0.1.0 checkpoints."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import logged_epochs, scaled_timeout
from datamodules import GraphStore
from datamodules.store import write_store_from_data
from datamodules.synthetic import write_synthetic_store
from difformer_lightning import KERNELS, DIFFormer, DiffusionKernel, NodeClassifier, kernel_class
from difformer_lightning.streaming import layerwise_inference
from test_exact import FEATURES, CLASSES, awkward_graph

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "data" / "checkpoints-0.1.0"
sys.path.insert(0, str(ROOT / "examples"))  # the user's module: outside the package, found by its class path

USER_KERNEL = "linear_transformer_kernel.LinearTransformerKernel"


def test_kernel_names_are_compared_in_the_kernels_module_only():
    """What each kernel is lives in difformer_lightning/kernels.py: no other module compares a kernel's name."""
    compared = re.compile(r"""kernel\S*\s*(==|!=|\bin\b)\s*[({]?\s*["'](simple|sigmoid|gcn|gat|none)["']""")
    files = [*(ROOT / "difformer_lightning").glob("*.py"), *(ROOT / "datamodules").glob("*.py"),
             *(ROOT / "callbacks").glob("*.py"), ROOT / "train.py"]
    found = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}" for path in files if path.name != "kernels.py"
             for number, line in enumerate(path.read_text().splitlines(), 1) if compared.search(line)]
    assert not found, found
    assert set(KERNELS) == {"simple", "sigmoid", "gcn", "gat", "none"}


@pytest.mark.parametrize("kernel, message", [
    ("softmax", "unknown kernel 'softmax': choose one of 'simple'"),
    ("no_such_module.Kernel", "cannot be imported"),
    ("torch.nn.Linear", "not a subclass of difformer_lightning.DiffusionKernel"),
])
def test_a_bad_kernel_is_named_with_the_fix(kernel, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        DIFFormer(4, 8, 2, kernel=kernel)


def test_a_kernel_cannot_be_both_all_pairs_and_local():
    class Both(DiffusionKernel):
        all_pairs = needs_graph = True

    with pytest.raises(ValueError, match="sets both all_pairs and needs_graph"):
        kernel_class(Both)


def test_each_kernel_says_what_it_needs():
    model = {name: DIFFormer(4, 8, 2, kernel=name) for name in KERNELS}
    assert {name: m.needs_graph for name, m in model.items()} == {
        "simple": True, "sigmoid": True, "gcn": True, "gat": True, "none": False}
    assert [name for name, m in model.items() if m.quadratic_cost] == ["sigmoid"]
    assert [name for name, m in model.items() if m.convs[0].needs_edge_list] == ["gat"]
    assert [name for name, m in model.items() if m.convs[0].query is not None] == ["simple", "sigmoid"]
    assert all(m.kernel.qualified_name() == name for name, m in model.items())
    assert DIFFormer(4, 8, 2, kernel=USER_KERNEL).kernel.qualified_name() == USER_KERNEL
    # the exact pass's cost: the sigmoid kernel grows with N^2, the others with N
    for name, m in model.items():
        ratio = m.exact_evaluation_flops(2000) / m.exact_evaluation_flops(1000)
        assert ratio == pytest.approx(4.0 if name == "sigmoid" else 2.0, rel=0.01), name


def dense_linear_transformer(conv, h):
    """The user kernel's layer (no graph term) as dense float64 matrices: S = phi(Q/t) phi(K)^T, row-normalised."""
    heads = conv.num_heads
    project = lambda linear: (h @ linear.weight.double().T + linear.bias.double()).view(h.size(0), heads, -1)  # noqa
    q, k, v = project(conv.query), project(conv.key), project(conv.value)
    temperature = conv.kernel.log_temperature.double().exp()
    out = []
    for head in range(heads):
        similarity = (F.elu(q[:, head] / temperature[head]) + 1) @ (F.elu(k[:, head]) + 1).T
        out.append(similarity / similarity.sum(dim=1, keepdim=True) @ v[:, head])
    return torch.stack(out).mean(dim=0)


def test_a_users_kernel_computes_its_formula():
    torch.manual_seed(0)
    conv = DIFFormer(6, 8, 2, num_heads=2, kernel=USER_KERNEL, use_graph=False).double().convs[0]
    with torch.no_grad():
        conv.kernel.log_temperature.copy_(torch.tensor([0.3, -0.2]))
    h = torch.randn(40, 8, dtype=torch.float64)
    torch.testing.assert_close(conv(h), dense_linear_transformer(conv, h))
    # a batch of graphs: each attends to itself only
    batch = torch.tensor([0] * 15 + [1] * 25)
    torch.testing.assert_close(conv(h, batch=batch), torch.cat([conv(h[:15]), conv(h[15:])]))


def test_a_users_kernel_owns_its_parameters_and_they_train():
    model = DIFFormer(6, 8, 2, kernel=USER_KERNEL)
    names = [name for name, _ in model.named_parameters()]
    assert "convs.0.kernel.log_temperature" in names and "convs.1.kernel.log_temperature" in names
    x, edge_index = torch.randn(30, 6), torch.randint(30, (2, 60))
    model(x, edge_index).square().sum().backward()
    assert model.convs[0].kernel.log_temperature.grad.abs().sum() > 0


@pytest.mark.parametrize("graph", ["none", "sum", "mix"])
@pytest.mark.parametrize("heads", [1, 3])
def test_a_users_kernel_streams_exactly(tmp_path, graph, heads):
    """The streamed exact pass (chunks of 7 nodes, the kernel's summarize/attend) equals the in-memory forward."""
    data = awkward_graph()
    store = GraphStore.open(write_store_from_data(data, tmp_path / "store"))
    torch.manual_seed(0)
    model = DIFFormer(FEATURES, 8, CLASSES, num_layers=3, num_heads=heads, kernel=USER_KERNEL,
                      use_graph=graph != "none", graph_weight=0.3 if graph == "mix" else -1.0).eval()
    with torch.no_grad():
        for conv in model.convs:
            conv.kernel.log_temperature.uniform_(-0.5, 0.5)
        expected = model(data.x, data.edge_index, data.edge_weight)
    got = layerwise_inference(model, store, chunk_nodes=7, workdir=tmp_path)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_checkpoints_written_by_0_1_0_load_and_give_their_logits(kernel):
    """Checkpoints of 0.1.0 (train.py fit, commit b26d31e): the same logits to the bit, and (GAT's attention
    vectors moved into its kernel) the saved optimiser state still maps onto parameters of its shapes."""
    expected = torch.load(FIXTURES / "expected_logits.pt")
    model = NodeClassifier.load_from_checkpoint(FIXTURES / f"{kernel}.ckpt", map_location="cpu").eval()
    with torch.no_grad():
        assert torch.equal(model.encoder(expected["x"], expected["edge_index"]), expected[kernel])
    saved = torch.load(FIXTURES / f"{kernel}.ckpt", weights_only=False)["optimizer_states"][0]
    optimizer = torch.optim.Adam(model.parameters())
    optimizer.load_state_dict(saved)
    for parameter in model.parameters():
        assert optimizer.state[parameter]["exp_avg"].shape == parameter.shape


def test_a_0_1_0_gat_state_dict_loads_into_the_encoder_directly():
    saved = torch.load(FIXTURES / "gat.ckpt", weights_only=False)["state_dict"]
    weights = {name[len("encoder."):]: value for name, value in saved.items() if name.startswith("encoder.")}
    assert "convs.0.att_source" in weights  # the 0.1.0 name
    encoder = DIFFormer(8, 8, 5, kernel="gat")
    encoder.load_state_dict(weights)
    assert torch.equal(encoder.convs[0].kernel.att_source, weights["convs.0.att_source"])


# --- a user's kernel through train.py ------------------------------------------------------------------------


def train_py(*args, run_dir: Path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "examples"), str(ROOT)])}
    command = [sys.executable, str(ROOT / "train.py"), *args, "--trainer.default_root_dir", str(run_dir),
               "--trainer.enable_progress_bar", "false"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=scaled_timeout(60))
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_a_users_kernel_trains_evaluates_exactly_and_resumes_from_the_command_line(tmp_path):
    store_path = write_synthetic_store(tmp_path / "csbm", 1003, num_classes=3, seed=3)
    common = ["--config", str(ROOT / "configs" / "synthetic_partition.yaml"), "--data.init_args.store", str(store_path),
              "--data.init_args.batch_size", "300", "--data.init_args.num_workers", "0",
              "--data.init_args.evaluation", "exact", "--model.encoder.init_args.hidden_channels", "16",
              "--model.encoder.init_args.kernel", USER_KERNEL]
    whole, split = tmp_path / "whole", tmp_path / "split"
    done = train_py("fit", *common, "--trainer.max_epochs", "3", run_dir=whole)
    assert "validation, test and prediction by exact" in done.stdout + done.stderr
    checkpoint = torch.load(whole / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["hyper_parameters"]["encoder"]["init_args"]["kernel"] == USER_KERNEL

    # the logged metrics are the saved weights' exact full-graph ones
    store = GraphStore.open(store_path)
    model = NodeClassifier.load_from_checkpoint(whole / "checkpoints" / "last.ckpt").eval()
    source, target, _ = store.in_edges(0, store.num_nodes)
    with torch.no_grad():
        logits = model.encoder(store.x.float(), torch.stack([source, target]))
    last = logged_epochs(whole)[2]
    for name in ("train", "val", "test"):
        index = getattr(store, f"{name}_idx")
        accuracy = (logits[index].argmax(dim=1) == store.y[index].long()).float().mean().item()
        assert last[f"{name}/acc"] == pytest.approx(accuracy, abs=1e-6), name

    # two epochs, then resumed to three: the weights of the uninterrupted run
    train_py("fit", *common, "--trainer.max_epochs", "2", run_dir=split)
    train_py("fit", *common, "--trainer.max_epochs", "3", "--ckpt_path", str(split / "checkpoints" / "last.ckpt"),
             run_dir=split)
    resumed = torch.load(split / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert resumed.keys() == checkpoint["state_dict"].keys()
    for name, value in checkpoint["state_dict"].items():
        assert torch.equal(resumed[name], value), name
