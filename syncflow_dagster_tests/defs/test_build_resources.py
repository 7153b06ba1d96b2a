"""build_resources(environ): the one place SyncFlow's variables become Dagster resources.

The code location's form keeps deployment values as EnvVars (the UI shows the
variable's name, never a secret); the in-process form (demo, benchmarks, test
harness) takes the mapping's values and nothing from the process environment;
tunables are resource config whose defaults are the settings classes'.
"""

from __future__ import annotations

import dagster as dg
import pytest

from syncflow_dagster.clients.apismith import ApiSmithSettings
from syncflow_dagster.clients.http import HttpSettings
from syncflow_dagster.clients.schedulehub import ScheduleHubSettings
from syncflow_dagster.defs.configuration import (
    ConfigurationError,
    build_resources,
    deployment_environment,
)
from syncflow_dagster.defs.resources import ApiSmithResource, HttpConfig, ScheduleHubResource, StoreConfig
from syncflow_dagster.store.database import StoreSettings

SECRET = "not-a-real-secret-4711"
DEPLOYMENT = deployment_environment(
    database_url="postgresql://nobody@127.0.0.1:9/none",
    apismith_url="http://127.0.0.1:9",
    apismith_secret=SECRET,
    schedulehub_url="http://127.0.0.1:9",
    schedulehub_secret=SECRET,
)


def test_the_code_location_form_names_variables_and_never_holds_a_secret() -> None:
    resources = build_resources(DEPLOYMENT, env_vars=True)
    apismith, schedulehub = resources["apismith"], resources["schedulehub"]
    assert isinstance(apismith.client_secret, dg.EnvVar)
    assert apismith.client_secret.env_var_name == "APISMITH_CLIENT_SECRET"
    assert isinstance(schedulehub.client_secret, dg.EnvVar)
    assert isinstance(resources["database"].url, dg.EnvVar)
    assert SECRET not in repr(resources)


def test_the_in_process_form_takes_the_mapping_and_not_the_process_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SYNCFLOW_HTTP_MAX_ATTEMPTS", "3")
    monkeypatch.setenv("SYNCFLOW_STORE_RETRY_MAX_ATTEMPTS", "4")
    resources = build_resources(
        {**DEPLOYMENT, "SYNCFLOW_PAGE_SIZE": "7", "SYNCFLOW_STAGE_RETENTION_DAYS": "2"}
    )
    apismith = resources["apismith"].client()
    assert apismith.settings.client_secret.get_secret_value() == SECRET
    assert apismith.settings.page_size == 7
    assert apismith.http.max_attempts == HttpSettings.model_fields["max_attempts"].default
    assert resources["frame_io_manager"].retention_days == 2
    store = resources["database"].store.settings()
    assert store.retry_max_attempts == StoreSettings.model_fields["retry_max_attempts"].default


def test_a_missing_deployment_value_is_named() -> None:
    partial = {k: v for k, v in DEPLOYMENT.items() if k != "SCHEDULEHUB_CLIENT_SECRET"}
    with pytest.raises(ConfigurationError, match="SCHEDULEHUB_CLIENT_SECRET"):
        build_resources(partial)


def test_client_ids_default_to_syncflow() -> None:
    unnamed = {k: v for k, v in DEPLOYMENT.items() if not k.endswith("_CLIENT_ID")}
    for env_vars in (True, False):
        resources = build_resources(unnamed, env_vars=env_vars)
        assert (resources["apismith"].client_id, resources["schedulehub"].client_id) == (
            "syncflow",
            "syncflow",
        )


@pytest.mark.parametrize(
    ("config", "settings"),
    [(HttpConfig, HttpSettings), (StoreConfig, StoreSettings)],
)
def test_tunable_config_has_the_settings_defaults(config: type[dg.Config], settings: type) -> None:
    """The UI shows the defaults the clients and the store would use: the names and values agree."""
    fields = config.model_fields
    assert set(fields) <= set(settings.model_fields)
    for name, info in fields.items():
        assert info.default == settings.model_fields[name].default, name
        assert info.description is not None, name
        assert info.description.startswith("SYNCFLOW_"), name


def test_client_tunables_have_the_settings_defaults() -> None:
    api = ApiSmithResource(base_url="http://127.0.0.1:9", client_id="c", client_secret="s").client()
    for name in ("token_path", "format", "garbage_page_retries", "page_size"):
        assert getattr(api.settings, name) == ApiSmithSettings.model_fields[name].default, name
    hub = ScheduleHubResource(base_url="http://127.0.0.1:9", client_id="c", client_secret="s").client()
    for name in ("token_url", "delivery_batch_size"):
        assert getattr(hub.settings, name) == ScheduleHubSettings.model_fields[name].default, name
    http_defaults = {name: info.default for name, info in HttpSettings.model_fields.items()}
    assert api.http.model_dump() == hub.http.model_dump() == http_defaults
