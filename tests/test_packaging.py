"""environment.yml (conda, GPU users) and pyproject.toml (pip) must name the same packages."""
import re
import tomllib

import yaml

from conftest import ROOT

# conda-forge package names that differ from their PyPI names
CONDA_TO_PYPI = {"pytorch": "torch", "pytorch-geometric": "torch-geometric"}
# conda-only plumbing with no PyPI counterpart in pyproject (pytorch-gpu: conda-forge's CUDA build selector)
CONDA_ONLY = {"python", "pip", "pytorch-gpu"}
# optional extras with no conda-forge package (environment.yml says where to get them)
NOT_ON_CONDA_FORGE = {"pyg-lib"}


def name_of(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_and_pyproject_agree():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pip_names = {name_of(r) for r in project["dependencies"]}
    for extra in project["optional-dependencies"].values():
        pip_names |= {name_of(r) for r in extra}
    pip_names -= NOT_ON_CONDA_FORGE
    environment = yaml.safe_load((ROOT / "environment.yml").read_text())
    # PyTorch stopped publishing to its pytorch and nvidia channels: conda-forge alone resolves today
    assert environment["channels"] == ["conda-forge"]
    conda_names = set()
    for entry in environment["dependencies"]:
        if isinstance(entry, dict):
            conda_names |= {name_of(r) for r in entry["pip"]}
        else:
            name = name_of(entry)
            if name not in CONDA_ONLY:
                conda_names.add(CONDA_TO_PYPI.get(name, name))
    assert conda_names == pip_names, (sorted(conda_names - pip_names), sorted(pip_names - conda_names))


def test_torch_is_a_lower_bound_so_a_cuda_build_is_kept():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    torch_requirement = next(r for r in project["dependencies"] if name_of(r) == "torch")
    assert "==" not in torch_requirement and ">=" in torch_requirement
