"""The deployment that `squeeze serve` serves: typed parameters with the recipe as defaults, a cron schedule."""

import pytest

from squeezeflow.flows.config import SqueezeConfig, parse_config
from squeezeflow.flows.deploy import make_deployment
from squeezeflow.tasks.base import ConfigError


def test_deployment_has_the_recipe_as_default_parameters_and_a_cron_schedule(tiny_config):
    cfg = parse_config(tiny_config)
    deployment = make_deployment(cfg, name="nightly", cron="0 2 * * *")
    assert deployment.name == "nightly" and deployment.flow_name == "compress"
    assert SqueezeConfig.model_validate(deployment.parameters["config"]) == cfg
    assert [s.schedule.cron for s in deployment.schedules] == ["0 2 * * *"]
    from prefect.utilities.callables import parameter_schema

    from squeezeflow.flows.compress import compress

    schema = parameter_schema(compress.fn).model_dump()  # what the Prefect UI renders as the run form
    assert "config" in schema["properties"] and "SqueezeConfig" in str(schema) and "max_accuracy_drop" in str(schema)
    assert deployment.entrypoint.endswith("compress.py:compress")


def test_bad_cron_is_a_config_error(tiny_config):
    with pytest.raises(ConfigError, match="--cron 'every night': not a cron expression"):
        make_deployment(parse_config(tiny_config), cron="every night")
