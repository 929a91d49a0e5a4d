"""The benchmark's server processes: ``python -m benchmarks.gateway.servers engine|gateway``.

Each runs in its own process (as in production) so the load generator, the gateway and
the engine do not share an event loop.
"""

from __future__ import annotations

import argparse

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
WARM_FAST = "warm-fast"  # the same, on the engine with a (short) time per token
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
    fast_engine_url: str,
    cold_start: float,
    queue_size: int,
    queue_timeout: float,
) -> None:
    def app():  # type: ignore[no-untyped-def]
        engines = {WARM_FAST: fast_engine_url}
        backend = BenchmarkBackend(
            [
                # Warm models stay at one replica: the runs measure the gateway, not scaling.
                make_model(WARM, min_replicas=1, max_replicas=1),
                make_model(WARM_FAST, min_replicas=1, max_replicas=1),
                make_model(COLD, keep_alive_seconds=1.0),
                make_model(STUCK),
            ],
            endpoint_for=lambda model, ordinal: engines.get(model, engine_url),
            cold_start_seconds=cold_start,
        )
        for model in (WARM, WARM_FAST):
            url = engines.get(model, engine_url)
            backend.add_model(
                backend.get_model(model).model,  # type: ignore[union-attr]
                instances=[ready_instance(model, f"{model}-0", url)],
            )
        settings = GatewaySettings(
            auth_enabled=False,
            access_log=False,  # one log line per request would measure the terminal
            queue_size_per_model=queue_size,
            queue_timeout_seconds=queue_timeout,
            autoscale_interval_seconds=0.2,
        )
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
    parser.add_argument("--fast-engine-url", default="")
    parser.add_argument("--token-delay", type=float, default=0.0)
    parser.add_argument("--cold-start", type=float, default=1.0)
    parser.add_argument("--queue-size", type=int, default=64)
    parser.add_argument("--queue-timeout", type=float, default=5.0)
    args = parser.parse_args()
    if args.role == "engine":
        run_engine(args.port, args.token_delay)
    else:
        run_gateway(
            args.port,
            engine_url=args.engine_url,
            fast_engine_url=args.fast_engine_url,
            cold_start=args.cold_start,
            queue_size=args.queue_size,
            queue_timeout=args.queue_timeout,
        )


if __name__ == "__main__":
    main()
