"""create_model / list_models / from_pretrained: names, directories, errors, the `tpas models` command."""

from __future__ import annotations

import json

import pytest
import torch

from tpas.cli import main
from tpas.models import create_model, list_models, registry
from tpas.models.base import CONFIG_NAME, WEIGHTS_NAME, parameter_counts


def test_list_models_has_the_named_configs():
    names = list_models()
    for name in ("lite", "lite-tiny", "clip", "clip-tiny"):
        assert name in names
    assert names == sorted(names)
    described = registry.describe_models()
    assert set(described) == set(names) and all(described[n] for n in ("lite", "lite-tiny", "clip"))


def test_overrides_reach_the_config():
    model = create_model("lite-tiny", image_size=(96, 48), embed_dim=16, fusion_layers=1)
    assert model.image_size == (96, 48) and model.config.embed_dim == 16 and len(model.fusion.layers) == 1
    assert create_model("lite-tiny").image_size == (64, 32)  # the named defaults were not mutated


def test_unknown_names_and_directories(tmp_path):
    with pytest.raises(KeyError, match="lite-tiny"):  # the message lists what exists
        create_model("no-such-model")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        create_model(tmp_path)
    with pytest.raises(TypeError, match="checkpoint"):
        create_model("lite-tiny", checkpoint=tmp_path / "x.pth")


def test_from_pretrained_errors(tmp_path):
    model = create_model("lite-tiny")
    model.save_pretrained(tmp_path / "m")
    data = json.loads((tmp_path / "m" / CONFIG_NAME).read_text())
    assert data["family"] == "lite" and data["config"]["image_size"] == [64, 32]
    # a config that no longer matches the weights is refused, naming the directory
    data["config"]["text_hidden"] = 48
    data["config"]["text_intermediate"] = 96
    (tmp_path / "m" / CONFIG_NAME).write_text(json.dumps(data))
    with pytest.raises(ValueError, match="do not fit"):
        create_model(tmp_path / "m")
    data["config"]["bogus_field"] = 1
    (tmp_path / "m" / CONFIG_NAME).write_text(json.dumps(data))
    with pytest.raises(ValueError, match="bogus_field"):
        create_model(tmp_path / "m")
    del data["config"]["bogus_field"]
    (tmp_path / "m" / CONFIG_NAME).write_text(json.dumps(data))
    (tmp_path / "m" / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=WEIGHTS_NAME):
        create_model(tmp_path / "m")


def test_overrides_when_loading_a_directory(tmp_path):
    torch.manual_seed(0)
    create_model("lite-tiny").save_pretrained(tmp_path / "m")
    loaded = create_model(tmp_path / "m", image_size=(96, 48), train_text_layers=0)
    assert loaded.image_size == (96, 48)
    assert not any(p.requires_grad for p in loaded.text_encoder.parameters())


def test_missing_family_module_is_skipped_but_broken_imports_are_not(monkeypatch):
    monkeypatch.setitem(registry.FAMILY_MODULES, "ghost", "tpas.models.ghost_family_not_written")
    assert "lite-tiny" in list_models()
    with pytest.raises(KeyError, match="not available"):
        create_model("ghost")
    # a family module that exists but fails on its own import is an error, not a skip
    monkeypatch.setitem(registry.FAMILY_MODULES, "broken", "tpas.models.broken_family")
    monkeypatch.setattr(registry.importlib, "import_module", _raise_inner_import)
    with pytest.raises(ModuleNotFoundError, match="some_missing_dependency"):
        registry._import_family_module("tpas.models.broken_family")


def _raise_inner_import(name):
    raise ModuleNotFoundError("No module named 'some_missing_dependency'", name="some_missing_dependency")


def test_parameter_counts():
    counts = parameter_counts(create_model("lite-tiny", train_text_layers=0))
    assert counts["total"] == sum(v for k, v in counts.items() if k not in ("total", "trainable"))
    assert counts["trainable"] == counts["total"] - counts["text_encoder"]


def test_models_command(capsys, tmp_path):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "lite-tiny" in out and "MobileNetV2" in out
    assert main(["models", "--json"]) == 0
    assert "clip-tiny" in json.loads(capsys.readouterr().out)
    assert main(["models", "lite-tiny", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "lite" and info["image_size"] == [64, 32] and info["parameters"]["total"] > 0
    assert main(["models", "no-such-model"]) == 2
    assert "unknown model" in capsys.readouterr().err


def test_a_name_gives_the_same_weights_in_every_process_and_leaves_the_callers_rng_alone():
    import subprocess
    import sys

    from tpas.search.index import model_fingerprint

    torch.manual_seed(123)
    before = torch.get_rng_state()
    here = model_fingerprint(create_model("lite-tiny"))
    assert torch.equal(torch.get_rng_state(), before)  # building did not draw from the global RNG
    torch.manual_seed(7)  # whatever the caller did to its RNG, the name decides
    assert model_fingerprint(create_model("lite-tiny")) == here
    code = ("from tpas.models import create_model; from tpas.search.index import model_fingerprint; "
            "print(model_fingerprint(create_model('lite-tiny')))")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert other.stdout.strip() == here
    assert model_fingerprint(create_model("lite-tiny", seed=1)) != here  # training passes train.seed


def test_training_refuses_a_model_that_would_start_from_random_weights(tmp_path, capsys):
    from tpas.errors import TpasError

    with pytest.raises(TpasError, match="model.from_scratch=true"):
        registry.check_starting_weights("xvlm-base", None, from_scratch=False)
    registry.check_starting_weights("xvlm-base", None, from_scratch=True)
    registry.check_starting_weights("xvlm-base", tmp_path / "16m.th", from_scratch=False)
    registry.check_starting_weights("lite", None, from_scratch=False)  # pretrained towers from packages
    registry.check_starting_weights("xvlm-small", None, from_scratch=False)  # a test config, random by design
    assert main(["train", "--config", "pab-xvlm", f"data.root={tmp_path}", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'xvlm-base' has no pretrained weights" in err and "from_scratch" in err
