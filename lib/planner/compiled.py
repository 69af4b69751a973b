"""The replay's core compiled with mypyc: the same source, about twice as fast.

A replay spends its time in three modules: ``lib.standin.scaling``,
``lib.standin.book`` and ``lib.planner.model``. mypyc (part of mypy) compiles
them, as they are, into C extensions. ``build()`` does that once per
interpreter and version of their source (about half a minute) and keeps the
result under ``$XDG_CACHE_HOME/null-pyworker/compiled/``. ``load()``, called
before anything imports those modules, puts a kept build in front of them, so
the process runs the compiled ones::

    python -m lib.planner.compiled      # build it for this interpreter, or say where it is

The planner uses a kept build; ``python -m lib.planner.speed`` builds one
first. Everything else (the tests, the real-time stand-in, a process that
imported the modules before ``load()``) runs the pure modules. A test holds
the two to the same figures. ``NULL_PLANNER_PURE=1`` keeps a process on the
pure modules.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.machinery
import importlib.metadata
import importlib.util
import os
import platform
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parents[2]
# What is compiled, in import order, and what else a build's figures depend on.
MODULES = ("lib.standin.scaling", "lib.standin.book", "lib.planner.model")
SOURCES = (*(name.replace(".", "/") + ".py" for name in MODULES), "lib/planner/trace.py", "lib/planner/compiled.py")
PACKAGES = ("lib/__init__.py", "lib/standin/__init__.py", "lib/planner/__init__.py")
# The shared library the modules' extensions load (mypyc's "group").
GROUP = "null_planner_core"
PURE_ENV = "NULL_PLANNER_PURE"
KEPT_BUILDS = 4
HEARTBEAT_S = 10.0

_BUILD_SCRIPT = f"""
import sys
from mypyc.build import mypycify
from setuptools import setup

out, temp, generated, *paths = sys.argv[1:]
setup(
    name="null-planner-core",
    packages=[],
    py_modules=[],
    ext_modules=mypycify(paths, target_dir=generated, group_name="{GROUP}"),
    script_args=["-q", "build_ext", "--build-lib", out, "--build-temp", temp],
)
"""


class BuildError(Exception):
    """Why the compiled core could not be built here, in one line."""


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "null-pyworker" / "compiled"


def _mypy_version() -> str | None:
    try:
        return importlib.metadata.version("mypy")
    except importlib.metadata.PackageNotFoundError:
        return None


def key() -> str:
    """What a build is for: this interpreter, this mypyc and these sources."""
    digest = hashlib.sha256()
    for part in (sys.version, sys.implementation.cache_tag, sysconfig.get_config_var("EXT_SUFFIX"), platform.machine()):
        digest.update(f"{part}\n".encode())
    digest.update(f"mypy {_mypy_version()}\n".encode())
    for source in SOURCES:
        digest.update(source.encode() + b"\n" + (ROOT / source).read_bytes())
    tag = sys.implementation.cache_tag or "python"
    return f"{tag}-{digest.hexdigest()[:20]}"


def _extension(directory: Path, dotted: str) -> Path | None:
    """The built extension of module ``dotted`` under ``directory``, if there."""
    *package, name = dotted.split(".")
    folder = directory.joinpath(*package)
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = folder / (name + suffix)
        if path.is_file():
            return path
    return None


def built() -> Path | None:
    """The kept build for this interpreter and these sources, or None."""
    directory = cache_root() / key()
    if all(_extension(directory, name) for name in (*MODULES, GROUP + "__mypyc")):
        return directory
    return None


def unavailable() -> str | None:
    """Why no build can be made here (one line with the fix), or None when it can."""
    if sys.implementation.name != "cpython":
        return f"mypyc compiles for CPython only, not {platform.python_implementation()}"
    if _mypy_version() is None or importlib.util.find_spec("mypyc") is None:
        return "mypyc is not installed: pip install -r requirements-dev.txt"
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        return f"no C compiler ({compiler}) on PATH: install one (Debian: apt install gcc)"
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not headers.is_file():
        return f"no {headers}: install this interpreter's headers (Debian: apt install python3-dev)"
    return None


def build(progress: Callable[[str], None] = lambda line: None) -> Path:
    """Builds the compiled core for this interpreter where none is kept; its directory. Raises BuildError."""
    kept = built()
    if kept is not None:
        return kept
    reason = unavailable()
    if reason:
        raise BuildError(reason)
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    final = root / key()
    work = Path(tempfile.mkdtemp(prefix="building-", dir=root))
    log = root / "last-build.log"
    try:
        source = work / "src"
        for name in (*PACKAGES, *SOURCES):
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ROOT / name, source / name)
        out = work / "out"
        command = [
            sys.executable, "-c", _BUILD_SCRIPT, str(out), str(work / "temp"), str(work / "c"),
            *(name.replace(".", "/") + ".py" for name in MODULES),
        ]  # fmt: skip
        env = {**os.environ, "MYPY_CACHE_DIR": str(work / "mypy-cache")}
        progress(f"compiling the planner's core with mypyc {_mypy_version()}, once for this interpreter...")
        started = time.monotonic()
        with log.open("wb") as output:
            code = _run(command, source, env, output, started, progress)
        if code != 0:
            raise BuildError(f"mypyc failed ({_first_error(log)}); the whole log is in {log}")
        for name in (*MODULES, GROUP + "__mypyc"):
            if _extension(out, name) is None:
                raise BuildError(f"mypyc built no extension for {name}; the log is in {log}")
        try:
            os.replace(out, final)
        except OSError:
            if built() is None:  # not another process that got there first
                raise
        progress(f"compiled in {time.monotonic() - started:.0f} s: {final}")
        _prune(root, keep=final)
        return final
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(
    command: list[str],
    cwd: Path,
    env: dict[str, str],
    output: IO[bytes],
    started: float,
    progress: Callable[[str], None],
) -> int:
    """Runs the build in its own process group, telling how long it has taken; stops the group if interrupted."""
    child = subprocess.Popen(command, cwd=cwd, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while True:
            try:
                return child.wait(HEARTBEAT_S)
            except subprocess.TimeoutExpired:
                progress(f"still compiling, {time.monotonic() - started:.0f} s")
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGTERM)
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()


def _first_error(log: Path) -> str:
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    found = (errors or lines or ["no output"])[0]
    return found if len(found) <= 200 else found[:197] + "..."


def _prune(root: Path, keep: Path) -> None:
    """Keeps the newest builds only: every change to the sources makes another."""
    builds = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith("building-")), key=_mtime)
    for old in builds[:-KEPT_BUILDS]:
        if old != keep:
            shutil.rmtree(old, ignore_errors=True)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def load(build_first: bool = False, progress: Callable[[str], None] = lambda line: None) -> str:
    """Puts the compiled core in front of the pure modules (building it first if asked); what this process runs.

    Call it before anything imports the modules. What it returns is
    ``running()``'s answer, or the pure modules with why.
    """
    if os.environ.get(PURE_ENV, "") not in ("", "0"):
        return f"pure Python ({PURE_ENV} is set)"
    if any(name in sys.modules for name in MODULES):
        return running() if is_compiled() else "pure Python (imported before the compiled core could load)"
    directory = built()
    if directory is None and build_first:
        try:
            directory = build(progress)
        except BuildError as exc:
            return f"pure Python (the compiled core could not be built: {exc})"
    if directory is None:
        return "pure Python (no compiled core built: python -m lib.planner.compiled builds it)"
    import lib.planner
    import lib.standin

    packages = {lib.standin: directory / "lib" / "standin", lib.planner: directory / "lib" / "planner"}
    for package, folder in packages.items():
        package.__path__.insert(0, str(folder))
    sys.path.append(str(directory))
    try:
        for name in MODULES:
            importlib.import_module(name)
    except ImportError as exc:
        for name in MODULES:
            sys.modules.pop(name, None)
        return f"pure Python (the compiled core did not load: {exc})"
    finally:
        # What is loaded stays in sys.modules; later imports look where they did.
        for package, folder in packages.items():
            package.__path__.remove(str(folder))
        sys.path.remove(str(directory))
    return running()


def is_compiled() -> bool:
    """Whether this process runs the compiled modules."""
    book = sys.modules.get("lib.standin.book")
    origin = getattr(book, "__file__", None) or ""
    return origin.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


def running() -> str:
    """The core this process runs, for a figure's line: compiled (with mypyc's version) or pure Python."""
    return f"compiled with mypyc {_mypy_version()}" if is_compiled() else "pure Python"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lib.planner.compiled",
        description="Build the planner's compiled core for this interpreter (once per version of its source).",
    )
    parser.parse_args(argv)

    def say(line: str) -> None:
        print(f"compiled core: {line}", file=sys.stderr, flush=True)

    interpreter = f"{platform.python_implementation()} {platform.python_version()}"
    kept = built()
    if kept is not None:
        print(f"compiled core: already built for {interpreter}: {kept}")
        return 0
    try:
        directory = build(say)
    except BuildError as exc:
        print(f"compiled core: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("compiled core: interrupted; nothing kept", file=sys.stderr)
        return 130
    print(f"compiled core: built for {interpreter}: {directory}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
