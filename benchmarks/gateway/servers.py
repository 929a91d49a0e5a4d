"""The benchmark's server processes: ``python -m benchmarks.gateway.servers engine|gateway``.

Each runs in its own process (as in production) so the load generator, the gateway and
the engine do not share an event loop.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import uvicorn

from hydraserve.gateway import GatewaySettings, create_app
from hydraserve.gateway.server import CLIENT_KEEPALIVE_SECONDS
from tests.support.fakes import (
    FakeClusterBackend,
    FakeEngine,
    FakeEngineBehaviour,
    make_model,
    ready_instance,
)

WARM = "warm"  # one ready instance from the start, on the instant engine
COLD = "cold"  # scales from zero; ready after --cold-start seconds; back to zero when idle
STUCK = "stuck"  # scales from zero but never becomes ready (deadline path)


class BenchmarkBackend(FakeClusterBackend):
    async def scale(self, name: str, replicas: int) -> None:
        if name == STUCK:
            self.scale_calls.append((name, replicas))
            return
        await super().scale(name, replicas)


def run_engine(port: int, token_delay: float) -> None:
    engine = FakeEngine(FakeEngineBehaviour(default_tokens=8, token_delay=token_delay))
    engine.stats.keep_bodies = False
    uvicorn.run(engine, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def run_gateway(
    port: int,
    *,
    engine_url: str,
    warm_engines: dict[str, str],
    cold_start: float,
    queue_size: int,
    queue_timeout: float | None,
    api_keys_file: Path,
) -> None:
    """The gateway as deployed: API keys required and one access-log event per request
    (its stdout/stderr go to a file, as a container runtime collects them)."""

    def app():  # type: ignore[no-untyped-def]
        engines = {WARM: engine_url, **warm_engines}
        backend = BenchmarkBackend(
            [
                # Warm models stay at one replica: the runs measure the gateway, not scaling.
                *(make_model(model, min_replicas=1, max_replicas=1) for model in engines),
                make_model(COLD, keep_alive_seconds=1.0),
                make_model(STUCK),
            ],
            endpoint_for=lambda model, ordinal: engines.get(model, engine_url),
            cold_start_seconds=cold_start,
        )
        for model, url in engines.items():
            backend.add_model(
                backend.get_model(model).model,  # type: ignore[union-attr]
                instances=[ready_instance(model, f"{model}-0", url)],
            )
        settings = GatewaySettings(
            auth_enabled=True,
            api_keys_file=api_keys_file,
            access_log=True,
            queue_size_per_model=queue_size,
            autoscale_interval_seconds=0.2,
        )
        if queue_timeout is not None:  # else the gateway's default
            settings = settings.model_copy(update={"queue_timeout_seconds": queue_timeout})
        return create_app(backend, settings)

    # The client keep-alive the `hydraserve gateway` command uses (longer than the load
    # generator's pool keeps idle connections, so no request races a closing connection).
    uvicorn.run(
        app,
        factory=True,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
        timeout_keep_alive=CLIENT_KEEPALIVE_SECONDS,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["engine", "gateway"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--engine-url", default="")
    parser.add_argument(
        "--warm-engine", action="append", default=[], help="MODEL=URL: another warm model"
    )
    parser.add_argument("--token-delay", type=float, default=0.0)
    parser.add_argument("--cold-start", type=float, default=1.0)
    parser.add_argument("--queue-size", type=int, default=64)
    parser.add_argument("--queue-timeout", type=float, default=None, help="default: gateway's")
    parser.add_argument("--api-keys-file", type=Path, default=None)
    args = parser.parse_args()
    if args.role == "engine":
        run_engine(args.port, args.token_delay)
    else:
        if args.api_keys_file is None:
            parser.error("the gateway runs with API keys: --api-keys-file")
        run_gateway(
            args.port,
            engine_url=args.engine_url,
            warm_engines=dict(item.split("=", 1) for item in args.warm_engine),
            cold_start=args.cold_start,
            queue_size=args.queue_size,
            queue_timeout=args.queue_timeout,
            api_keys_file=args.api_keys_file,
        )


if __name__ == "__main__":
    main()
