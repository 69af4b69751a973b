"""The compiled core's bookkeeping: what a build is for, when a process may load one, why one cannot be made."""

from __future__ import annotations

import copy
import dataclasses
import pickle
import shutil
import sys

import pytest

from lib.planner import compiled
from lib.planner.model import Plan
from lib.standin.book import Answer, BookSettings, Deleted, Provision, Resume, Stop
from lib.standin.scaling import EndpointParams, LocalPolicy, Snapshot, WaitingRequest


@pytest.fixture
def sources(tmp_path, monkeypatch):
    """A copy of the sources a build depends on, standing in for the checkout."""
    for name in (*compiled.PACKAGES, *compiled.SOURCES):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(compiled.ROOT / name, tmp_path / name)
    monkeypatch.setattr(compiled, "ROOT", tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path


def test_a_build_is_for_one_version_of_each_source_and_one_interpreter(sources, monkeypatch):
    """Changing any source the build depends on, or the interpreter, names another build."""
    first = compiled.key()
    assert compiled.key() == first
    assert first.startswith(sys.implementation.cache_tag + "-")
    seen = {first}
    for name in compiled.SOURCES:
        path = sources / name
        text = path.read_text()
        path.write_text(text + "\n# changed\n")
        seen.add(compiled.key())
        path.write_text(text)
    assert len(seen) == len(compiled.SOURCES) + 1
    assert compiled.key() == first
    monkeypatch.setattr(sys, "version", sys.version + " (another build)")
    assert compiled.key() != first


def test_no_build_is_found_in_an_empty_cache_or_a_partial_one(sources):
    """built() wants every extension of the build, the shared one included."""
    assert compiled.built() is None
    folder = compiled.cache_root() / compiled.key()
    suffix = compiled.importlib.machinery.EXTENSION_SUFFIXES[0]
    names = (*compiled.MODULES, compiled.GROUP + "__mypyc")
    for name in names[:-1]:
        *package, module = name.split(".")
        (folder.joinpath(*package)).mkdir(parents=True, exist_ok=True)
        folder.joinpath(*package, module + suffix).write_bytes(b"")
    assert compiled.built() is None
    (folder / (compiled.GROUP + "__mypyc" + suffix)).write_bytes(b"")
    assert compiled.built() == folder


def test_a_process_that_already_imported_the_modules_stays_pure(monkeypatch):
    """Here the pure modules are imported already: load() leaves them, and says why."""
    monkeypatch.delenv(compiled.PURE_ENV, raising=False)
    before = {name: sys.modules[name] for name in compiled.MODULES}
    assert compiled.load(build_first=True) == "pure Python (imported before the compiled core could load)"
    assert {name: sys.modules[name] for name in compiled.MODULES} == before
    assert not compiled.is_compiled() and compiled.running() == "pure Python"


def test_the_environment_can_keep_a_process_pure(monkeypatch):
    monkeypatch.setenv(compiled.PURE_ENV, "1")
    assert compiled.load(build_first=True) == f"pure Python ({compiled.PURE_ENV} is set)"


def test_why_no_build_can_be_made_is_one_line_with_the_fix(monkeypatch):
    """No mypyc, no C compiler: each is named with what to install."""
    monkeypatch.setattr(compiled, "_mypy_version", lambda: None)
    assert compiled.unavailable() == "mypyc is not installed: pip install -r requirements-dev.txt"
    with pytest.raises(compiled.BuildError, match="requirements-dev.txt"):
        compiled.build()
    monkeypatch.setattr(compiled, "_mypy_version", lambda: "2.4.1")
    monkeypatch.setattr(compiled.sysconfig, "get_config_var", lambda name: "no-such-cc -pthread")
    reason = compiled.unavailable()
    assert reason is not None and "no C compiler (no-such-cc)" in reason and "\n" not in reason


@pytest.mark.parametrize(
    "value",
    [
        EndpointParams(min_load=200.0, inactivity_timeout=None),
        LocalPolicy(scale_down_delay=2.0),
        Snapshot(now=3.0, waiting=(WaitingRequest(1, 100.0, 2.5),), last_activity=1.0),
        BookSettings(params=EndpointParams(max_workers=3), route_hold=0.0),
        Deleted(7, success=False, status="Rejected"),
        Provision(1),
        Resume(2),
        Stop(3, keep=True, reason="surplus"),
        Answer(4, None),
        Plan(params=EndpointParams(cold_workers=2), cold_start=(5.0, 9.0), cold_start_each=(6.0,), max_sessions=4),
    ],
    ids=lambda value: type(value).__name__,
)
def test_frozen_records_are_pickled_and_copied_by_their_fields(value):
    """As a sweep sends plans to its processes: what comes back is equal, of the same kind, and still frozen."""
    first = next(iter(value.__dataclass_fields__))
    for back in (pickle.loads(pickle.dumps(value)), copy.copy(value), copy.deepcopy(value)):
        assert back == value and type(back) is type(value)
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(back, first, None)
    assert value.__reduce__() == (type(value), tuple(getattr(value, f) for f in value.__dataclass_fields__))
