"""Ray Serve's own cost per request on this machine: a no-op deployment reached in one hop (HTTP proxy -> deployment)
and in two (proxy -> front -> deployment, as squeeze deploy's router does), 200 sequential keep-alive requests each.

    python -m bench.serve_overhead
"""

import http.client
import time

from squeezeflow.tasks.evaluate import machine

PORT = 18100


def timed(route: str, requests: int = 200) -> tuple[float, float]:
    """p50 and p90 (ms) of `requests` sequential POSTs on one keep-alive connection."""
    connection, samples = http.client.HTTPConnection("127.0.0.1", PORT), []
    for _ in range(requests):
        started = time.perf_counter()
        connection.request("POST", route, "{}")
        connection.getresponse().read()
        samples.append((time.perf_counter() - started) * 1000)
    samples.sort()
    return samples[len(samples) // 2], samples[int(len(samples) * 0.9)]


def main() -> None:
    import ray
    from ray import serve
    from starlette.requests import Request

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class Echo:
        async def __call__(self, request: Request) -> dict:
            await request.body()
            return {"ok": 1}

        async def predict(self, value: int) -> int:
            return value

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class Front:
        def __init__(self, echo) -> None:
            self.echo = echo

        async def __call__(self, request: Request) -> dict:
            await request.body()
            return {"ok": await self.echo.predict.remote(1)}

    ray.init(include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": PORT})
        serve.run(Echo.bind(), name="one", route_prefix="/one")
        serve.run(Front.bind(Echo.bind()), name="two", route_prefix="/two")
        timed("/one"), timed("/two")  # warm-up
        print(f"machine: {machine()}")
        for route, hops in (("/one", "one hop"), ("/two", "two hops")):
            p50, p90 = timed(route)
            print(f"{hops}: p50 {p50:.1f} ms, p90 {p90:.1f} ms")
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
