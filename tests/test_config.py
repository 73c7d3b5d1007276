"""Config files stay in step with the code."""

from pathlib import Path

import pytest
import yaml

from wsimil.config import Config, defaults_yaml, load_config
from wsimil.demo import demo_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_default_yaml_lists_the_code_defaults():
    text = (CONFIGS / "default.yaml").read_text()
    assert yaml.safe_load(text) == Config().model_dump()
    assert text == defaults_yaml(), "regenerate it: wsimil config > configs/default.yaml"


def test_demo_yaml_is_the_demo_config():
    assert load_config(CONFIGS / "demo.yaml") == demo_config()


def test_paper_config_sets_every_key_it_names_and_trains_without_a_validation_split():
    raw = yaml.safe_load((CONFIGS / "paper_mil.yaml").read_text())["train"]
    cfg = load_config(CONFIGS / "paper_mil.yaml").train
    assert {k: getattr(cfg, k) for k in raw} == raw  # no key silently ignored or coerced
    assert cfg.protocol == "cv" and cfg.val_fraction == 0.0 and cfg.n_folds * cfg.n_repeats == 50


def test_flags_override_the_file_and_unknown_keys_are_refused(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("tile: {tile_px: 128, target_mpp: 1.0}\n")
    cfg = load_config(f, tile={"tile_px": 512, "target_mpp": None})
    assert cfg.tile.tile_px == 512 and cfg.tile.target_mpp == 1.0
    f.write_text("tile: {tile_size: 128}\n")
    with pytest.raises(ValueError, match="tile_size"):
        load_config(f)


@pytest.mark.parametrize("dataset, flags", [("musk1", {}), ("elephant", {"weight_decay": 0.001})])
def test_the_documented_cli_command_gives_the_reproduction_scripts_settings(dataset, flags):
    import importlib.util

    path = CONFIGS.parent / "benchmarks" / "reproduce_table1.py"
    spec = importlib.util.spec_from_file_location("reproduce_table1", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    ref = script.paper_config(dataset, "gated_attention", folds=10, repeats=5, seed=0)
    cli = load_config(CONFIGS / "paper_mil.yaml", train={"model": "gated_attention", **flags})
    assert cli.train.model_dump() == ref.model_dump()
