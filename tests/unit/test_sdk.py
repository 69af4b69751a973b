"""The SDK door: the internals it relies on exist, and a loopback client skips the CA download once."""

from __future__ import annotations

from workers.null.dispatch import sdk


def test_the_sdk_internals_the_project_relies_on_exist():
    """Every private SDK name sdk.py overrides is present in the installed SDK."""
    assert sdk.missing_internals() == []


async def test_a_loopback_client_makes_its_tls_context_once_and_downloads_nothing():
    """A client for a local stand-in hands the SDK the same system-CA
    context on every request (each new one costs ~30 ms)."""
    client = sdk.make_client("key", "local", "http://127.0.0.1:9")
    try:
        first = await client.get_ssl_context()
        assert await client.get_ssl_context() is first
    finally:
        await client.close()
