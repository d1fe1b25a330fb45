"""How the tests find their datasets (conftest.py): a clone with nothing beside it and no network skips
what needs data with one summary line, ``CI=true`` makes that an error, ``DIFFORMER_TEST_DATA`` serves all."""
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, data_folder, scaled_timeout

NEEDS_DATA = '''
from conftest import data_folder


def test_needs_planetoid():
    assert (data_folder("planetoid") / "Cora" / "raw").is_dir()


def test_needs_nothing():
    assert True
'''


def run_clone(tmp_path, **env):
    """pytest on a clone of conftest.py alone, with no ``shared`` folder beside it, an empty cache and every
    download refused at once (a proxy on a closed port): a machine with no data and no network."""
    clone = tmp_path / "clone"
    (clone / "tests").mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "tests" / "conftest.py", clone / "tests" / "conftest.py")
    (clone / "tests" / "test_needs_data.py").write_text(NEEDS_DATA)
    environment = {key: value for key, value in os.environ.items() if key not in ("DIFFORMER_TEST_DATA", "CI")}
    environment.update({"XDG_CACHE_HOME": str(tmp_path / "cache"), "HOME": str(tmp_path / "home"),
                        "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
                        "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
                        "no_proxy": "", "NO_PROXY": "", **env})
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"], cwd=clone,
                          env=environment, capture_output=True, text=True, timeout=scaled_timeout(30))


@pytest.mark.slow
def test_no_data_and_no_network_skips_with_one_summary_line(tmp_path):
    result = run_clone(tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "1 passed, 1 skipped" in result.stdout
    summary = [line for line in result.stdout.splitlines() if line.startswith("datasets not found")]
    assert len(summary) == 1 and "planetoid" in summary[0] and "DIFFORMER_TEST_DATA" in summary[0], result.stdout


@pytest.mark.slow
def test_ci_makes_a_missing_dataset_an_error_naming_it(tmp_path):
    result = run_clone(tmp_path, CI="true")
    assert result.returncode != 0
    assert "1 failed, 1 passed" in result.stdout
    assert "dataset 'planetoid' not found" in result.stdout and "CI=true" in result.stdout


def test_difformer_test_data_serves_every_test(tmp_path):
    folder = data_folder("planetoid")  # skipped here too when this machine has no Planetoid files
    result = run_clone(tmp_path, DIFFORMER_TEST_DATA=str(folder.parent), CI="true")
    assert result.returncode == 0, result.stdout[-3000:]
    assert "2 passed" in result.stdout and "datasets not found" not in result.stdout

