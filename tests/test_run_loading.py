"""A saved run's config rebuilt from its config.json, as resuming it would read it."""

import json

from conftest import load_config

from mtl_gbml import base_config, train
from mtl_gbml.run_loading import saved_config


def _saved(path, variant="runlocal"):
    return json.loads(load_config(path, variant).to_json_best_effort())


def test_saved_values_come_back_with_their_types():
    saved = _saved("configs/omniglot/mtl.py")
    config = saved_config(saved)
    assert json.loads(config.to_json_best_effort()) == saved
    assert isinstance(config.eval.settings, tuple)


def test_keys_added_since_the_run_take_the_value_the_code_had_before_them():
    """A run saved before ``model.block`` and ``algo.solver_tol`` existed ran the reference block
    and MetaOptNet's solver without a tolerance: it is rebuilt so, as resuming it compares it, not
    with today's defaults ('fused', a tolerance)."""
    saved = _saved("configs/omniglot/metaoptnet.py")
    assert saved["model"]["block"] != "reference" and saved["algo"]["solver_tol"] != 0.0
    del saved["model"]["block"], saved["algo"]["solver_tol"], saved["train"]["val_extra_settings"]
    config = saved_config(saved)
    assert config.model.block == base_config.LEGACY_VALUES["model.block"] == "reference"
    assert config.algo.solver_tol == 0.0
    assert config.train.val_extra_settings == ()
    # and resuming it under those values is no change of config
    assert train.config_differences(saved, json.loads(config.to_json_best_effort())) == []
