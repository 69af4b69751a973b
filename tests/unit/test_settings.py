import pytest

from workers.null.instance.settings import DEFAULT_CONTROL_PORT, DEFAULT_MAX_LIFETIME, Settings, SettingsError

BASE = {
    "WORKER_PORT": "3000",
    "VAST_TCP_PORT_3000": "41234",
    "CONTAINER_ID": "17",
    "REPORT_ADDR": "https://run.vast.ai",
    "PUBLIC_IPADDR": "203.0.113.9",
}


def env(**changes):
    merged = {**BASE, **changes}
    return {k: v for k, v in merged.items() if v is not None}


def test_defaults_fill_everything_optional():
    """Only the platform variables are needed; the rest has documented defaults."""
    settings = Settings.from_env(env())
    assert settings.control_port == DEFAULT_CONTROL_PORT == 18999
    assert settings.max_lifetime == DEFAULT_MAX_LIFETIME == 86400
    assert settings.backend_health_url is None
    assert settings.worker_http_port == 3001
    assert settings.log_level == "INFO"
    assert not settings.use_ssl and not settings.unsecured
    assert settings.url == "http://203.0.113.9:41234"


def test_ssl_makes_the_reported_url_https():
    """USE_SSL=true is what Vast sets; the signed URL is then https."""
    assert Settings.from_env(env(USE_SSL="true")).url == "https://203.0.113.9:41234"


def test_every_report_address_is_kept():
    """REPORT_ADDR may list several autoscalers, as the framework allows."""
    settings = Settings.from_env(env(REPORT_ADDR="https://a.example, https://b.example"))
    assert settings.report_addrs == ("https://a.example", "https://b.example")


def test_optional_settings_are_read():
    """The null worker's own variables change what they name."""
    settings = Settings.from_env(
        env(
            NULL_CONTROL_PORT="19000",
            BACKEND_HEALTH_URL="http://127.0.0.1:8000/healthz",
            NULL_MAX_LIFETIME="3600",
            NULL_LOG_LEVEL="debug",
            UNSECURED="yes",
            WORKER_HTTP_PORT="3100",
        )
    )
    assert settings.control_port == 19000
    assert settings.backend_health_url == "http://127.0.0.1:8000/healthz"
    assert settings.max_lifetime == 3600.0
    assert settings.log_level == "DEBUG"
    assert settings.unsecured
    assert settings.worker_http_port == 3100


@pytest.mark.parametrize(
    "changes, names",
    [
        ({"WORKER_PORT": None}, "WORKER_PORT"),
        ({"WORKER_PORT": "http"}, "WORKER_PORT"),
        ({"WORKER_PORT": "70000"}, "WORKER_PORT"),
        ({"VAST_TCP_PORT_3000": None}, "VAST_TCP_PORT_3000"),
        ({"CONTAINER_ID": None}, "CONTAINER_ID"),
        ({"CONTAINER_ID": "abc"}, "CONTAINER_ID"),
        ({"REPORT_ADDR": None}, "REPORT_ADDR"),
        ({"REPORT_ADDR": "run.vast.ai"}, "REPORT_ADDR"),
        ({"REPORT_ADDR": "https://ok.example,ftp://bad"}, "REPORT_ADDR"),
        ({"PUBLIC_IPADDR": ""}, "PUBLIC_IPADDR"),
        ({"NULL_CONTROL_PORT": "0"}, "NULL_CONTROL_PORT"),
        ({"NULL_CONTROL_PORT": "-1"}, "NULL_CONTROL_PORT"),
        ({"BACKEND_HEALTH_URL": "localhost:8000/health"}, "BACKEND_HEALTH_URL"),
        ({"BACKEND_HEALTH_URL": "http://:8000/health"}, "BACKEND_HEALTH_URL"),
        ({"NULL_MAX_LIFETIME": "0"}, "NULL_MAX_LIFETIME"),
        ({"NULL_MAX_LIFETIME": "inf"}, "NULL_MAX_LIFETIME"),
        ({"NULL_MAX_LIFETIME": "a day"}, "NULL_MAX_LIFETIME"),
        ({"NULL_LOG_LEVEL": "LOUD"}, "NULL_LOG_LEVEL"),
        ({"USE_SSL": "True"}, "USE_SSL"),
        ({"UNSECURED": "maybe"}, "UNSECURED"),
    ],
    ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}={v}" for k, v in v.items()),
)
def test_bad_setting_fails_with_one_line_naming_it(changes, names):
    """A missing or malformed variable is one line that names it and says what to set."""
    with pytest.raises(SettingsError) as raised:
        Settings.from_env(env(**changes))
    message = str(raised.value)
    assert message.startswith(names), message
    assert "\n" not in message
    assert "set it to" in message or "unset it" in message, message
