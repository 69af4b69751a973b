"""The compiled core as a user gets it: built by ``python -m lib.planner.compiled``, equal to the pure modules."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lib.planner import compiled

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def run(*argv: str, cache: Path, pure: bool = False, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    env.pop(compiled.PURE_ENV, None)
    if pure:
        env[compiled.PURE_ENV] = "1"
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache of its own holding a build for this interpreter, made as the docs say."""
    if compiled.unavailable():
        pytest.fail(f"the compiled core cannot be built here: {compiled.unavailable()}")
    folder = tmp_path_factory.mktemp("cache")
    done = run("-m", "lib.planner.compiled", cache=folder)
    assert done.returncode == 0, done.stderr
    assert "built for" in done.stdout and "compiling" in done.stderr
    return folder


def test_a_build_is_kept_and_found_again(cache):
    """The build holds an extension per module; asking again builds nothing and names the same folder."""
    builds = [p for p in (cache / "null-pyworker" / "compiled").iterdir() if p.is_dir()]
    assert len(builds) == 1
    for name in (*compiled.MODULES, compiled.GROUP + "__mypyc"):
        assert compiled._extension(builds[0], name) is not None, name
    again = run("-m", "lib.planner.compiled", cache=cache)
    assert again.returncode == 0 and "already built" in again.stdout and str(builds[0]) in again.stdout
    assert "compiling" not in again.stderr


def test_the_compiled_core_gives_the_pure_figures_exactly(cache):
    """Every replay's figures, waits, timeline and phase seconds are the same compiled and pure."""
    fast = run("-m", "tests.e2e.replays", cache=cache)
    slow = run("-m", "tests.e2e.replays", cache=cache, pure=True)
    assert fast.returncode == 0, fast.stderr
    assert slow.returncode == 0, slow.stderr
    fast_core, *fast_lines = fast.stdout.splitlines()
    slow_core, *slow_lines = slow.stdout.splitlines()
    assert json.loads(fast_core)["compiled"] is True, fast_core
    assert json.loads(slow_core)["compiled"] is False, slow_core
    assert len(fast_lines) == len(slow_lines) == 3 * 6 + 2
    for compiled_line, pure_line in zip(fast_lines, slow_lines, strict=True):
        assert compiled_line == pure_line
        replay = json.loads(compiled_line)
        assert replay["back"] == replay["result"]  # a result pickled and read back, as a sweep's are


def test_a_sweep_over_processes_runs_compiled_and_agrees(cache, tmp_path):
    """``python -m lib.planner`` with a kept build says it runs compiled, and its JSON equals the pure run's."""
    argv = ("-m", "lib.planner", "--diurnal", "1.5:8", "--max-workers", "10,30", "--min-load", "0,200")
    outputs = []
    for pure in (False, True):
        out = tmp_path / f"pure-{pure}.json"
        done = run(*argv, "--processes", "2", "--json", str(out), cache=cache, pure=pure)
        assert done.returncode == 0, done.stderr
        assert ("(pure Python;" if pure else "(compiled core)") in done.stderr, done.stderr
        outputs.append(json.loads(out.read_text())["results"])
    assert len(outputs[0]) == 4
    assert outputs[0] == outputs[1]


def test_a_source_that_does_not_compile_gives_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    """A type error in the core's source: BuildError naming mypyc's first error and the log; no build kept."""
    if compiled.unavailable():
        pytest.fail(f"the compiled core cannot be built here: {compiled.unavailable()}")
    source = tmp_path / "src"
    for name in (*compiled.PACKAGES, *compiled.SOURCES):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / name, source / name)
    model = source / "lib" / "planner" / "model.py"
    model.write_text(model.read_text() + '\n\ndef broken() -> int:\n    return "not a number"\n')
    monkeypatch.setattr(compiled, "ROOT", source)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(compiled.BuildError) as failed:
        compiled.build()
    message = str(failed.value)
    assert "\n" not in message
    assert "mypyc failed" in message and "model.py" in message and "last-build.log" in message
    root = compiled.cache_root()
    assert sorted(p.name for p in root.iterdir()) == ["last-build.log"]
    assert compiled.built() is None
