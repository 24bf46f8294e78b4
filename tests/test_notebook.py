"""notebooks/colab_tpu.ipynb runs end to end on CPU in its quick mode (local data, :runlocal configs,
no installs), so that it cannot rot."""

import json
import os

import pytest
from conftest import ROOT, subprocess_env

NOTEBOOK = ROOT / "notebooks" / "colab_tpu.ipynb"


def test_colab_notebook_runs_in_quick_mode(tmp_path, data_dir, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    monkeypatch.setenv("MTL_GBML_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("MTL_GBML_NOTEBOOK_RUNS", str(tmp_path))
    monkeypatch.setenv("MTL_GBML_REPO", str(ROOT))
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    # the kernel trains as a user's would: without the test processes' XLA flag
    kernel_env = subprocess_env()
    for key in set(os.environ) - set(kernel_env):
        monkeypatch.delenv(key)
    for key, value in kernel_env.items():
        monkeypatch.setenv(key, value)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    )
    client.execute()
    for name in ("mtl", "maml"):
        res = json.load(open(tmp_path / name / "results.json"))
        assert res["algorithm"] == name and res["train"]["steps"] >= 1
        assert os.path.exists(tmp_path / name / "eval_test.json")
    assert (tmp_path / "validation.png").stat().st_size > 0
    outputs = "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
    )
    assert "quick mode" in outputs and "5way1shot" in outputs
