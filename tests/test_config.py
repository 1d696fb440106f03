import json
from pathlib import Path

import pytest
import yaml

from squeezeflow.flows.config import SqueezeConfig, load_config, parse_config
from squeezeflow.tasks.base import ConfigError

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path, tree) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree) if not isinstance(tree, str) else tree)
    return path


def test_quickstart_recipe_is_valid_and_paths_become_absolute(monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = load_config("configs/quickstart.yaml")
    assert cfg.name == "quickstart" and cfg.model.num_labels == 3
    assert cfg.data.train.is_absolute() and cfg.data.train.is_file()
    assert [s.kind for s in cfg.stages] == ["export", "quantize"]
    assert cfg.registered_model == "squeezeflow-quickstart"


@pytest.mark.parametrize("recipe, classes", [("sst2", 2), ("trec", 6)])
def test_real_data_recipes_pass_the_preflight_on_the_shared_data(monkeypatch, tmp_path, recipe, classes):
    from squeezeflow.flows.cli import preflight
    from squeezeflow.tasks.data import load_splits

    monkeypatch.chdir(REPO)
    cfg = load_config(f"configs/{recipe}.yaml", [f"artifacts_dir={tmp_path}"])
    preflight(cfg)  # data files, labels, every stage's own checks, the packaged model
    splits = load_splits(cfg.data, cfg.model.num_labels)
    assert cfg.model.num_labels == len(cfg.data.label_names) == classes
    assert set(splits.train.labels) == set(splits.validation.labels) == set(splits.eval.labels) == set(range(classes))


def test_unknown_key_is_rejected_with_its_path(tmp_path, tiny_config):
    tiny_config["teacher"]["epoch"] = 3
    with pytest.raises(ConfigError, match=r"recipe.yaml: teacher.epoch: unknown key"):
        load_config(write(tmp_path, tiny_config))


def test_wrong_type_names_field_and_value(tiny_config):
    tiny_config["benchmark"]["rounds"] = "many"
    with pytest.raises(ConfigError, match=r"benchmark.rounds: .*integer.*\(got 'many'\)"):
        parse_config(tiny_config)


def test_set_overrides_nested_values_and_list_items(tiny_config):
    cfg = parse_config(
        tiny_config,
        overrides=[
            "teacher.epochs=0.5",
            "stages.1.per_channel=true",
            "selection.objective=size",
            "data.label_names=[a, b]",
        ],
    )
    assert cfg.teacher.epochs == 0.5
    assert cfg.stages[1].per_channel is True
    assert cfg.selection.objective == "size"
    assert cfg.data.label_names == ["a", "b"]


def test_set_rejects_malformed_items(tiny_config):
    with pytest.raises(ConfigError, match=r"--set 'teacher.epochs': expected key.sub=value"):
        parse_config(tiny_config, overrides=["teacher.epochs"])
    with pytest.raises(ConfigError, match=r"--set stages.5.opset: stages.5 does not exist"):
        parse_config(tiny_config, overrides=["stages.5.opset=1"])
    with pytest.raises(ConfigError, match=r"--set model.source.x: model.source is a value, not a section with keys"):
        parse_config(tiny_config, overrides=["model.source.x=1"])
    with pytest.raises(ConfigError, match=r"--set stages.1.modes.0.a.b: stages.1.modes.0 is a value, not a section"):
        parse_config(tiny_config, overrides=["stages.1.modes.0.a.b=1"])


def test_invalid_yaml_reports_line(tmp_path):
    path = write(tmp_path, "name: x\nmodel: [unclosed\n")
    with pytest.raises(ConfigError, match=r"recipe.yaml: invalid YAML at line \d+"):
        load_config(path)


def test_top_level_must_be_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_label_names_must_match_num_labels(tiny_config):
    tiny_config["data"]["label_names"] = ["a", "b", "c"]
    with pytest.raises(ConfigError, match="data.label_names has 3 names but model.num_labels is 2"):
        parse_config(tiny_config)


def test_quantize_needs_an_export_before_it(tiny_config):
    tiny_config["stages"] = [{"kind": "quantize"}]
    with pytest.raises(ConfigError, match="stages.0: quantize works on ONNX variants"):
        parse_config(tiny_config)


def test_unknown_stage_kind(tiny_config):
    tiny_config["stages"] = [{"kind": "magic"}]
    with pytest.raises(ConfigError, match="unknown stage kind 'magic'"):
        parse_config(tiny_config)


def test_unknown_packaged_model(tiny_config):
    tiny_config["model"]["source"] = "packaged:bert-huge"
    with pytest.raises(ConfigError, match="unknown packaged model 'packaged:bert-huge'"):
        parse_config(tiny_config)


def test_config_is_frozen(tiny_config):
    cfg = parse_config(tiny_config)
    with pytest.raises(Exception):
        cfg.seed = 3


def test_schema_describes_every_section():
    schema = SqueezeConfig.model_json_schema()
    assert {"name", "model", "data", "teacher", "stages", "benchmark", "selection", "tracking"} <= set(
        schema["properties"]
    )
    assert json.dumps(schema)  # serialisable, for `squeeze schema` and the Prefect form


def test_the_recipe_reference_in_docs_is_the_one_generated_from_the_schema():
    from squeezeflow.flows.reference import recipe_reference

    reference = Path(__file__).resolve().parents[1] / "docs" / "reference.md"
    assert reference.read_text() == recipe_reference(), "run: squeeze schema --markdown > docs/reference.md"
