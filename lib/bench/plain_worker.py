"""A worker built from the framework's defaults, as a PyWorker author would write it.

The benchmark runs it beside the null worker to show what the framework
alone does: ``python -m lib.bench.plain_worker`` with the same environment.
"""

from __future__ import annotations

from typing import Any

from vastai.serverless.server.worker import BenchmarkConfig, HandlerConfig, Worker, WorkerConfig


class NothingToLoad:
    async def __aenter__(self) -> NothingToLoad:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        return None


async def pong(**_: Any) -> dict:
    return {"pong": True}


def build_config() -> WorkerConfig:
    return WorkerConfig(
        lifecycle=NothingToLoad(),
        handlers=[HandlerConfig(route="/ping", benchmark_config=BenchmarkConfig(dataset=[{}]), remote_function=pong)],
    )


if __name__ == "__main__":
    Worker(build_config()).run()
