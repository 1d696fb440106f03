"""The deployment that `squeeze serve` serves: typed parameters with the recipe as defaults, a cron schedule."""

import pytest

from squeezeflow.flows.config import STAGE_ORDER, parse_config
from squeezeflow.flows.deploy import make_deployment
from squeezeflow.flows.form import Recipe
from squeezeflow.tasks.base import ConfigError


def test_deployment_has_the_recipe_as_default_parameters_and_a_cron_schedule(tiny_config):
    cfg = parse_config(tiny_config)
    deployment = make_deployment(cfg, name="nightly", cron="0 2 * * *")
    assert deployment.name == "nightly" and deployment.flow_name == "compress"
    assert Recipe.model_validate(deployment.parameters["config"]).to_config() == cfg
    assert [s.schedule.cron for s in deployment.schedules] == ["0 2 * * *"]
    from prefect.utilities.callables import parameter_schema

    from squeezeflow.flows.compress import compress

    schema = parameter_schema(compress.fn).model_dump()  # what the Prefect UI renders as the run form
    assert "config" in schema["properties"] and "max_accuracy_drop" in str(schema)
    assert deployment.entrypoint.endswith("compress.py:compress")


def free_form(schema: dict, parameter: str = "config") -> list[str]:
    """Where Prefect's run form would fall back to a raw JSON box: a `oneOf`, or an object or value of no type."""
    defs, found = schema.get("definitions") or schema.get("$defs") or {}, []

    def walk(node: dict, where: str) -> None:
        if "$ref" in node:
            return walk(defs[node["$ref"].rsplit("/", 1)[-1]], where)
        if "oneOf" in node:
            found.append(f"{where}: oneOf")
        for option in node.get("anyOf", []) + node.get("allOf", []):
            walk(option, where)
        if not ({"type", "anyOf", "allOf", "enum", "const"} & node.keys()):
            found.append(f"{where}: no type")
        if node.get("type") == "object" and "properties" not in node:
            found.append(f"{where}: untyped object")
        for name, child in node.get("properties", {}).items():
            walk(child, f"{where}.{name}")
        if isinstance(node.get("items"), dict):
            walk(node["items"], f"{where}[]")

    walk(schema["properties"][parameter], parameter)
    return found


def test_the_run_form_has_a_typed_section_per_stage_and_no_free_form_json():
    from prefect.utilities.callables import parameter_schema

    from squeezeflow.flows.compress import compress

    schema = parameter_schema(compress.fn).model_dump()
    assert free_form(schema) == []
    sections = schema["definitions"]["StageSections"]["properties"]
    assert list(sections) == list(STAGE_ORDER)
    quantize = schema["definitions"]["QuantizeConfig"]["properties"]
    assert quantize["modes"]["items"]["enum"] == ["dynamic", "static", "qat", "torch-dynamic"]
    undescribed = [
        f"{section}.{name}"
        for section, definition in schema["definitions"].items()
        for name, field in definition.get("properties", {}).items()
        if name != "kind" and not field.get("description")
    ]
    assert undescribed == []


def test_bad_cron_is_a_config_error(tiny_config):
    with pytest.raises(ConfigError, match="--cron 'every night': not a cron expression"):
        make_deployment(parse_config(tiny_config), cron="every night")


def test_the_search_deployment_offers_every_knob_as_a_value_or_a_search(tiny_config):
    from prefect.utilities.callables import parameter_schema

    from squeezeflow.flows.deploy import make_search_deployment
    from squeezeflow.flows.form import SearchRecipe
    from squeezeflow.flows.search import SearchOptions, search
    from squeezeflow.flows.space import SearchSpace

    tiny_config["stages"] = [{"kind": "export"}, {"kind": "quantize", "modes": {"search": [["dynamic"], ["static"]]}}]
    deployment = make_search_deployment(tiny_config, SearchOptions(trials=5), cron="0 3 * * 6")
    assert deployment.flow_name == "search" and deployment.name == "tiny-search"
    assert deployment.parameters["options"]["trials"] == 5
    tree = SearchRecipe.model_validate(deployment.parameters["recipe"]).to_tree()
    assert [d.name for d in SearchSpace(tree).dimensions] == ["quantize.modes"]

    schema = parameter_schema(search.fn).model_dump()
    # only a choice's list of values (any JSON) is free-form; every knob is typed, or a search
    assert [spot for spot in free_form(schema, "recipe") if not spot.endswith("search[]: no type")] == []
    learning_rate = schema["definitions"]["SearchableTeacherConfig"]["properties"]["learning_rate"]
    assert {option.get("$ref", "").rsplit("/", 1)[-1] for option in learning_rate["anyOf"]} >= {"Search"}
