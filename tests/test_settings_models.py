"""Every settings file fedemb reads is one typed model: an unknown key, a wrong type or an out-of-range
value is one line naming the key, for each of the four kinds (run config, the task's synthesis settings,
experiment specs, task specs); docs/configuration.md is generated from the models and is current; a
default lives in one place."""

from pathlib import Path

import pytest

from fedemb.config import Config, InvertConfig, load_config, to_dict, with_overrides
from fedemb.config_docs import render
from fedemb.errors import ConfigError
from fedemb.experiments import load_spec
from fedemb.synth.task_spec import custom_settings, load_task

REPO = Path(__file__).resolve().parents[1]
BAD = ("unknown", "type", "range")


def one_line_naming(exc: pytest.ExceptionInfo, key: str) -> str:
    message = str(exc.value)
    assert "\n" not in message and key in message, message
    return message


@pytest.mark.parametrize("bad, key, needle", [
    ("sampling.rte=0.1", "sampling.rte", "unknown key"),
    ('sampling.rate="high"', "sampling.rate", "must be a number"),
    ("sampling.rate=1.5", "sampling.rate", "must be in (0, 1], got 1.5"),
    ("privacy.adaptive.target_quantile=1", "privacy.adaptive.target_quantile", "must be in (0, 1)"),
    ("run.rounds=2.5", "run.rounds", "must be an integer"),
    ("client.epochs=true", "client.epochs", "must be an integer"),
    ('privacy.mechanism="laplace"', "privacy.mechanism", "must be one of gaussian, tree; got 'laplace'"),
    ("data.held_out_classes=[1, 2.5]", "data.held_out_classes[1]", "must be an integer"),
])
def test_a_run_config_error_is_one_line_naming_the_key(bad, key, needle):
    with pytest.raises(ConfigError) as exc:
        load_config(None, [bad])
    assert needle in one_line_naming(exc, key)


@pytest.mark.parametrize("raw, key", [({"stepz": 1}, "synthesis.stepz"), ({"steps": "many"}, "synthesis.steps"),
                                      ({"temperature": 0}, "synthesis.temperature")])
def test_a_synthesis_settings_error_is_one_line_naming_the_key(raw, key):
    with pytest.raises(ConfigError) as exc:
        custom_settings(raw, "task.toml")
    assert one_line_naming(exc, key).startswith("task.toml: ")


SPEC = 'name = "x"\nconfig = "simulations/configs/quickstart.toml"\n[[group]]\nlabel = "a"\n'


@pytest.mark.parametrize("edit, key", [
    (lambda s: s + "colour = 1\n", "group[0].colour"),
    (lambda s: s.replace('label = "a"', "label = 3"), "group[0].label"),
    (lambda s: s.replace('name = "x"', 'name = "x"\nseeds = [-1]'), "seeds[0]"),
])
def test_an_experiment_spec_error_is_one_line_naming_the_key(tmp_path, edit, key):
    spec = tmp_path / "spec.toml"
    spec.write_text(edit(SPEC))
    with pytest.raises(ConfigError) as exc:
        load_spec(spec, {}, REPO, tmp_path)
    assert one_line_naming(exc, key).startswith(f"{spec}: ")


TASK = '''name = "t"
[levels]
foreground = "L1"
background = "L1"
[[classes]]
name = "zero"
references = ["zero.png"]
'''


@pytest.mark.parametrize("edit, key", [
    (lambda s: "sede = 1\n" + s, "sede"),
    (lambda s: s.replace('name = "zero"', "name = 0"), "classes[0].name"),
    (lambda s: "delta = 1.5\n" + s, "delta"),
    (lambda s: s.replace('background = "L1"', 'background = "L4"'), "levels.background"),
    (lambda s: s + "[synthesis]\nsteps = -1\n", "synthesis.steps"),
])
def test_a_task_spec_error_is_one_line_naming_the_key_before_any_file_is_read(tmp_path, edit, key):
    task = tmp_path / "task.toml"
    task.write_text(edit(TASK))  # zero.png does not exist: the settings are checked first
    with pytest.raises(ConfigError) as exc:
        load_task(task, (1, 8, 8))
    one_line_naming(exc, key)


def test_the_configuration_reference_is_generated_from_the_models_and_current():
    written = (REPO / "docs" / "configuration.md").read_text()
    assert written == render(), "docs/configuration.md is stale: run `fedemb config docs --out docs/configuration.md`"


def every_field(model, prefix=""):
    for name, field in model.model_fields.items():
        annotation = field.annotation
        inner = getattr(annotation, "model_fields", None)
        if inner is not None:
            yield from every_field(annotation, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", field


def test_every_run_config_key_is_documented_in_its_model():
    undocumented = [key for key, field in every_field(Config) if not (field.description or "").strip()]
    assert not undocumented


def test_the_data_sources_the_model_allows_are_the_loaders_there_are():
    import typing

    from fedemb.config import DataName
    from fedemb.data.loaders import DATASETS

    assert set(typing.get_args(DataName)) == set(DATASETS)


def test_the_inversion_defaults_are_the_invert_settings_defaults():
    """They had drifted apart (steps 1000 vs 500, weight_tv 1e-3 vs 0.01): now the library reads them from the model."""
    from fedemb.synth.inversion import InversionSettings

    library, settings = InversionSettings(), InvertConfig()
    for name in ("steps", "lr", "weight_statistics", "weight_class", "weight_tv", "weight_l2", "temperature",
                 "jitter", "flip"):
        assert getattr(library, name) == getattr(settings, name), name


def test_a_config_round_trips_through_its_resolved_toml_and_overrides_make_a_new_validated_copy(tmp_path):
    cfg = load_config(REPO / "simulations" / "configs" / "quickstart.toml")
    from fedemb.config import to_toml

    (tmp_path / "c.toml").write_text(to_toml(cfg))
    assert load_config(tmp_path / "c.toml") == cfg
    changed = with_overrides(cfg, {"privacy.clip_norm": 0.5})
    assert changed.privacy.clip_norm == 0.5 and cfg.privacy.clip_norm == to_dict(cfg)["privacy"]["clip_norm"] != 0.5
    with pytest.raises(ConfigError, match="privacy.clip_norm must be > 0"):
        with_overrides(cfg, ["privacy.clip_norm=0"])


def test_fedemb_config_check_names_the_kind_or_the_bad_key(tmp_path):
    from tests.helpers import cli

    code, output = cli("config", "check", REPO / "scripts" / "experiments" / "mnist-methods.toml")
    assert code == 0 and "valid experiment spec" in output
    bad = tmp_path / "run.toml"
    bad.write_text("[sampling]\nrate = 2\n")
    code, output = cli("config", "check", bad)
    assert code == 2 and "sampling.rate must be in (0, 1], got 2" in output and len(output.strip().splitlines()) == 1
