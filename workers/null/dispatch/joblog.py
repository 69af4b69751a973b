"""The dispatcher's job log: one JSON line per job attempt (``--job-log FILE``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO

from workers.null.dispatch.ledger import Attempt, Ledger


class JobLog:
    """One JSON line per attempt, written when its outcome is known."""

    def __init__(self, path: Path | None):
        self.path = path
        self._file: IO[str] | None = None

    def open(self) -> None:
        if self.path is not None:
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()

    def write(self, row: Attempt) -> None:
        if self._file is not None:
            self._file.write(json.dumps(row.to_dict()) + "\n")
            self._file.flush()

    def close(self, ledger: Ledger | None = None) -> None:
        if self._file is None:
            return
        if ledger is not None:
            for row in ledger.unfinished():
                data = row.to_dict()
                data["outcome"] = "unfinished"
                self._file.write(json.dumps(data) + "\n")
        self._file.close()
        self._file = None
