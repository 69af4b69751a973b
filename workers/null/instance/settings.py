"""The worker's settings, read from the environment once and validated at start."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from workers.null.protocol import DEFAULT_CONTROL_PORT

DEFAULT_MAX_LIFETIME = 24 * 3600.0
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# The spellings the framework's strtobool accepts for UNSECURED.
_TRUE = {"y", "yes", "t", "true", "on", "1"}
_FALSE = {"n", "no", "f", "false", "off", "0"}


class SettingsError(ValueError):
    """A missing or malformed variable; the message names it and the fix."""


@dataclass(frozen=True)
class Settings:
    worker_port: int
    worker_http_port: int
    container_id: int
    report_addrs: tuple[str, ...]
    public_ip: str
    public_port: int
    use_ssl: bool
    unsecured: bool
    control_port: int = DEFAULT_CONTROL_PORT
    backend_health_url: str | None = None
    max_lifetime: float = DEFAULT_MAX_LIFETIME
    # A session no consumer claims within this many seconds is released; None: never.
    claim_deadline: float | None = None
    log_level: str = "INFO"

    @property
    def url(self) -> str:
        """The URL the worker reports and the autoscaler signs grants for."""
        scheme = "https" if self.use_ssl else "http"
        return f"{scheme}://{self.public_ip}:{self.public_port}"

    @property
    def log_level_number(self) -> int:
        return getattr(logging, self.log_level)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        worker_port = _port(
            env,
            "WORKER_PORT",
            required=True,
            hint="the port the worker listens on (Vast sets it; the stock template uses 3000)",
        )
        public_port_name = f"VAST_TCP_PORT_{worker_port}"
        return cls(
            worker_port=worker_port,
            worker_http_port=_port(
                env,
                "WORKER_HTTP_PORT",
                default=worker_port + 1,
                hint="the plain-HTTP port for /session/end (default WORKER_PORT+1)",
            ),
            container_id=_int(env, "CONTAINER_ID", hint="the instance id Vast sets; any whole number locally"),
            report_addrs=_report_addrs(env),
            public_ip=_required(
                env, "PUBLIC_IPADDR", hint="the instance's public address (Vast sets it; 127.0.0.1 locally)"
            ),
            public_port=_port(
                env,
                public_port_name,
                required=True,
                hint=f"the public port mapped to WORKER_PORT {worker_port} "
                f"(Vast sets it; locally the same number, {public_port_name}={worker_port})",
            ),
            # The framework serves TLS only for exactly "true": any other spelling would
            # leave it on plain HTTP while grants name an https URL.
            use_ssl=_flag(env, "USE_SSL", default=False, spellings=({"true"}, {"false"})),
            unsecured=_flag(env, "UNSECURED", default=False, spellings=(_TRUE, _FALSE), fold_case=True),
            control_port=_port(
                env,
                "NULL_CONTROL_PORT",
                default=DEFAULT_CONTROL_PORT,
                hint="a free loopback port for the control server (default 18999)",
            ),
            backend_health_url=_health_url(env),
            max_lifetime=_positive_seconds(env, "NULL_MAX_LIFETIME", default=DEFAULT_MAX_LIFETIME),
            claim_deadline=_positive_seconds(env, "NULL_CLAIM_DEADLINE", default=None, example=30),
            log_level=_log_level(env),
        )


def _value(env: Mapping[str, str], name: str) -> str | None:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return None
    return raw.strip()


def _required(env: Mapping[str, str], name: str, *, hint: str) -> str:
    value = _value(env, name)
    if value is None:
        raise SettingsError(f"{name} is not set: set it to {hint}")
    return value


def _int(env: Mapping[str, str], name: str, *, hint: str) -> int:
    value = _required(env, name, hint=hint)
    try:
        return int(value)
    except ValueError:
        raise SettingsError(f"{name}={value!r} is not a whole number: set it to {hint}") from None


def _port(
    env: Mapping[str, str],
    name: str,
    *,
    hint: str,
    required: bool = False,
    default: int | None = None,
) -> int:
    value = _value(env, name)
    if value is None:
        if required or default is None:
            raise SettingsError(f"{name} is not set: set it to {hint}")
        return default
    try:
        port = int(value)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise SettingsError(f"{name}={value!r} is not a port number (1-65535): set it to {hint}")
    return port


def _flag(env: Mapping[str, str], name: str, *, default: bool, spellings, fold_case: bool = False) -> bool:
    value = _value(env, name)
    if value is None:
        return default
    truthy, falsy = spellings
    word = value.lower() if fold_case else value
    if word in truthy:
        return True
    if word in falsy:
        return False
    raise SettingsError(f"{name}={value!r} is not a boolean: set it to true or false")


def http_url(value: object) -> bool:
    """An absolute http(s) URL with a host."""
    if not isinstance(value, str):
        return False
    try:
        parts = urlsplit(value)
        _ = parts.port  # raises ValueError on a malformed port
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def _report_addrs(env: Mapping[str, str]) -> tuple[str, ...]:
    value = _required(
        env,
        "REPORT_ADDR",
        hint="the autoscaler's base URL (Vast sets https://run.vast.ai; the local stand-in's URL locally)",
    )
    addrs = tuple(part.strip() for part in value.split(","))
    for addr in addrs:
        if not http_url(addr):
            raise SettingsError(
                f"REPORT_ADDR={value!r} holds {addr!r}, not an absolute http(s) URL: "
                "set it to the autoscaler's base URL, e.g. https://run.vast.ai"
            )
    return addrs


def _health_url(env: Mapping[str, str]) -> str | None:
    value = _value(env, "BACKEND_HEALTH_URL")
    if value is None:
        return None
    if not http_url(value):
        raise SettingsError(
            f"BACKEND_HEALTH_URL={value!r} is not an absolute http(s) URL: set it to your consumer's health "
            "endpoint, e.g. http://127.0.0.1:8000/health, or unset it"
        )
    return value


def _positive_seconds(
    env: Mapping[str, str], name: str, *, default: float | None, example: float | None = None
) -> float | None:
    value = _value(env, name)
    if value is None:
        return default
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise SettingsError(
            f"{name}={value!r} is not a positive number of seconds: set it to e.g. {int(example or default or 1)}, "
            "or unset it"
        )
    return seconds


def _log_level(env: Mapping[str, str]) -> str:
    value = _value(env, "NULL_LOG_LEVEL")
    if value is None:
        return "INFO"
    if value.upper() not in LOG_LEVELS:
        raise SettingsError(f"NULL_LOG_LEVEL={value!r} is not a log level: set it to one of {', '.join(LOG_LEVELS)}")
    return value.upper()
