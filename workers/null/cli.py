"""What the project's commands share: one-line usage errors, start-up errors, Ctrl-C, log lines."""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Awaitable, Coroutine, Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from workers.null.aio import wait_any

log = logging.getLogger(__name__)
T = TypeVar("T")
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line naming the problem, not the whole usage text."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


class DefaultsShown(argparse.HelpFormatter):
    """Each flag's default in its own syntax (``60``, ``30:90``, ``1,2``), unless its help already says it.

    Flags that are off unless given (a default of None or False) show none.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        shown = default is not None and default is not False and default is not argparse.SUPPRESS
        optional = action.option_strings or action.nargs in ("?", "*")
        if "(default" in text or not shown or not optional or default == []:
            return text
        return f"{text} (default: {as_typed(default)})"


def as_typed(value: Any) -> str:
    """A flag's value as it would be typed: lists comma-joined, a (low, high) span as LOW:HIGH."""
    if isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value):
        low, high = value
        return as_typed(low) if low == high else f"{as_typed(low)}:{as_typed(high)}"
    if isinstance(value, (list, tuple)):
        return ",".join(as_typed(v) for v in value)
    if value is None:
        return "off"
    return f"{value:g}" if isinstance(value, float) else str(value)


@contextmanager
def sigterm_as_ctrl_c() -> Iterator[None]:
    """Inside the block SIGTERM raises KeyboardInterrupt: a command a supervisor stops cleans up as on Ctrl-C."""
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def output_file_problem(flag: str, path: str | os.PathLike[str] | None) -> str | None:
    """Why ``path`` cannot be written as ``flag``'s output file (None: it can), checked before any work starts."""
    if path is None:
        return None
    target = Path(path)
    folder = target.parent
    if target.is_dir():
        return f"{flag} {target}: is a directory; name a file"
    if not folder.is_dir():
        return f"{flag} {target}: there is no directory {folder}; create it or name a file elsewhere"
    if not os.access(folder, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        return f"{flag} {target}: not writable; name a file you can write"
    return None


def positive(x: float) -> bool:
    """A finite number above 0 (for a flag's check)."""
    return math.isfinite(x) and x > 0


def non_negative(x: float) -> bool:
    """A finite number of 0 or more (for a flag's check)."""
    return math.isfinite(x) and x >= 0


def refuse_first(parser: argparse.ArgumentParser, checks: Iterable[tuple[bool, str]]) -> None:
    """``parser.error`` with the message of the first check that failed (each is ``(ok, message)``)."""
    for ok, message in checks:
        if not ok:
            parser.error(message)


class StartupError(Exception):
    """Cannot start: one line naming the problem and the fix; ``code`` is the exit status."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def run_command(prog: str, main: Coroutine[Any, Any, int]) -> int:
    """Runs a command's ``main``: a StartupError becomes its one line and exit code, an early Ctrl-C 130."""
    try:
        return asyncio.run(main)
    except StartupError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:  # before the event loop took over Ctrl-C: nothing was opened yet
        return 128 + signal.SIGINT


def missing_api_key(prog: str, instance: str, try_instead: str) -> int:
    """Says VAST_API_KEY is needed for ``--instance instance`` and what to try instead; the exit code."""
    print(
        f"{prog}: VAST_API_KEY is not set: export your Vast API key to use --instance {instance}, or try {try_instead}",
        file=sys.stderr,
    )
    return 2


def short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


class Interrupt:
    """The first SIGINT or SIGTERM: which one, and an event to wait on; ``again`` is set by a second one."""

    def __init__(
        self,
        first: str = "interrupted: closing every open session",
        again: str = "still closing sessions; each close gives up after 10s",
    ) -> None:
        self.event = asyncio.Event()
        self.again = asyncio.Event()
        self.signum: int | None = None
        self._messages = (first, again)

    def __call__(self, signum: int) -> None:
        if self.signum is None:
            self.signum = signum
            log.info("%s", self._messages[0])
            self.event.set()
        else:
            log.info("%s", self._messages[1])
            self.again.set()

    def install(self) -> None:
        """Takes over SIGINT and SIGTERM in the running loop until ``uninstall``."""
        loop = asyncio.get_running_loop()
        for signum in SIGNALS:
            loop.add_signal_handler(signum, self, signum)

    def uninstall(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in SIGNALS:
            loop.remove_signal_handler(signum)

    @property
    def is_set(self) -> bool:
        return self.event.is_set()

    async def race(self, awaitable: Awaitable[T]) -> tuple[bool, T | None]:
        """Awaits ``awaitable`` unless interrupted first (then cancels it): (finished, result)."""
        task = asyncio.ensure_future(awaitable)
        stopper = asyncio.ensure_future(self.event.wait())
        try:
            await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
        if task.done():
            return True, task.result()
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task
        return False, None

    async def sleep(self, seconds: float) -> bool:
        """Sleeps; True when interrupted before the time was up."""
        return await wait_any([self.event], seconds)


class Elapsed(logging.Formatter):
    """``[  12.3s] message``: seconds since the command started; ``local`` marks the stand-in's lines."""

    def __init__(self, started: float):
        super().__init__()
        self.started = started

    def format(self, record: logging.LogRecord) -> str:
        source = "local " if record.name.startswith("lib.") else ""
        return f"[{record.created - self.started:6.1f}s] {source}{record.getMessage()}"


def configure_logging(names: Iterable[str], *, verbose: bool = False) -> None:
    """INFO for ``names`` and the stand-in, on stdout with elapsed seconds; the SDK quiet unless ``verbose``."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(Elapsed(time.time()))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    for name in (*names, "lib"):
        logging.getLogger(name).setLevel(logging.INFO)
    # The SDK logs every failed route or create at ERROR; the commands report
    # each outcome themselves.
    sdk_level = logging.INFO if verbose else logging.CRITICAL
    for name in ("vastai", "Serverless", "SessionClient"):
        logging.getLogger(name).setLevel(sdk_level)
