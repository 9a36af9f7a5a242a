"""What each per-request step of the gateway costs, timed in process (µs per call, best of 3 runs).

    python bench/stage_costs.py [--calls 20000]
    python bench/stage_costs.py --in-situ [--requests 2000]   # and inside real requests, ~1 min
    python bench/stage_costs.py --in-situ --body-kb 1024 --requests 200   # … with a Claude Code body of 1 MB

The core benchmark says how much slower than a bare proxy the gateway is; this says where the difference
goes. Each step is called the way the gateway calls it for one ~5 KB non-streaming request (two upstream
accounts, no network): authn, decoding, prompt analysis, policy, routing with its trace, shaping and
signing, reading the answer's rate-limit headers and usage, and the accounting after the answer (pricing,
usage record, observers). Sampling profilers attribute this asynchronous code poorly; calling each step
many times does not.

A step called in a loop runs on warm caches; inside a request it runs once between the event loop, the
HTTP parser and aiohttp. `--in-situ` also serves requests in process through the gateway's ASGI interface
(the mock upstream in a subprocess on core 0, this process on core 1, one request at a time) with each step
wrapped in a timer of the thread's CPU clock, and, interleaved with them, the same requests through the
bare proxy: it prints each step's median inside requests next to its loop time, and what aiohttp's own
request cost each of the two (the steps are the gateway's; the rest of a request is not).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy

import bigbody
import procs
from bare_proxy import BareProxy
from load import request_body
from poolgate import app as gateway_module
from poolgate.api.anthropic import decode_request
from poolgate.api.http import fields_of
from poolgate.app import Gateway
from poolgate.cache.breakpoints import prompt_prefix
from poolgate.config import GatewayConfig, StaticKey, UpstreamConfig
from poolgate.lifecycle import relay as relay_module
from poolgate.lifecycle.accounting import billable, usage_record
from poolgate.lifecycle.context import Usage
from poolgate.lifecycle.policy import ADMITTED
from poolgate.lifecycle.relay import RelayResult
from poolgate.lifecycle.shape import shape
from poolgate.lifecycle.usage import usage_from_json
from poolgate.serve import run
from poolgate.upstreams.ratelimits import parse_ratelimit_headers

KEY = "pg-stage-costs-0123456789abcdef"
ANSWER = (
    b'{"id":"msg_1","type":"message","role":"assistant","model":"claude-sonnet-4-5","content":[{"type":"text",'
    b'"text":"hello"}],"stop_reason":"end_turn","usage":{"input_tokens":1200,"output_tokens":20,'
    b'"cache_creation_input_tokens":0,"cache_read_input_tokens":0}}'
)


def answer_headers() -> CIMultiDictProxy[str]:
    """What the mock (and the API) send with every answer: four rate-limit windows."""
    reset = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 60))
    pairs = [
        (f"anthropic-ratelimit-{kind}-{field}", value)
        for kind in ("requests", "tokens", "input-tokens", "output-tokens")
        for field, value in (("limit", "4000000"), ("remaining", "3999000"), ("reset", reset))
    ]
    return CIMultiDictProxy(CIMultiDict([*pairs, ("content-type", "application/json"), ("request-id", "req_1")]))


def timed(name: str, call: Callable[[], object], calls: int) -> float:
    best = float("inf")
    for _ in range(3):
        began = time.perf_counter()
        for _ in range(calls):
            call()
        best = min(best, (time.perf_counter() - began) / calls * 1e6)
    print(f"{best:8.2f} µs  {name}", flush=True)
    return best


# The steps, by the name both tables use.
AUTHN = "authn (gateway key → principal)"
DECODE = "decode the request"
PREFIX = "prompt analysis (cache breakpoints)"
POLICY = "policy (admission)"
ROUTE = "route (filters, scoring, trace)"
SHAPE_SIGN = "shape + sign"
HEADERS = "rate-limit headers of the answer"
USAGE = "usage of a JSON answer"
FINISH = "charging after the answer (_finish)"
ACCOUNT = "usage record + observers (_account, per request)"
RECORD = "  of which: the usage record (with the trace as JSON)"
PRICE = "  of which: the price"
TOTALLED = (AUTHN, DECODE, PREFIX, POLICY, ROUTE, SHAPE_SIGN, HEADERS, USAGE, FINISH, ACCOUNT)


def work_dir() -> Path:
    """A fresh directory under bench/.work, as the other harnesses keep their files (a gateway's store and
    master key, the mock's log): /tmp was left with one per run."""
    procs.WORK.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=time.strftime("stage-costs-%Y%m%d-%H%M%S-"), dir=procs.WORK))


def gateway_config(upstream_url: str) -> GatewayConfig:
    return GatewayConfig(
        data_dir=work_dir(),
        upstreams=tuple(
            UpstreamConfig(id=name, base_url=upstream_url, api_key=f"sk-ant-api03-{name}") for name in "ab"
        ),
        keys=(StaticKey(name="bench", key=KEY),),
    )


def request_headers(body: bytes) -> list[tuple[bytes, bytes]]:
    return [
        (b"content-type", b"application/json"),
        (b"anthropic-version", b"2023-06-01"),
        (b"x-api-key", KEY.encode()),
        (b"content-length", str(len(body)).encode()),
    ]


def in_a_loop(calls: int) -> dict[str, float]:
    gateway = Gateway(gateway_config("http://127.0.0.1:1"))
    body = request_body(False)
    headers = request_headers(body)
    ctx = decode_request("messages", "req_1", "/v1/messages", b"", headers, body)
    assert ctx.prompt is not None
    ctx.principal = gateway.authn.authenticate(fields_of(headers))
    ctx.prefix = prompt_prefix(ctx.prompt, ctx.body)
    decision = gateway.router.route(ctx.model, time.monotonic(), None, ctx.prefix, "bench")
    state = decision.order[0]
    received = answer_headers()
    usage = Usage(input_tokens=1200, output_tokens=20)
    result = RelayResult(upstream_id=state.upstream.id, status=200, usage=usage, first_byte_at=time.perf_counter())

    route = decision.trace.to_json()

    def finish() -> None:
        gateway._finish(ctx, result, decision.trace, ADMITTED, route)
        # Its batch is timed as the next step: set it aside without accounting it.
        if gateway._account_call is not None:
            gateway._account_call.cancel()
            gateway._account_call = None
        batch.extend(gateway._finished)
        gateway._finished.clear()

    def account() -> None:
        gateway._finished.append(batch[-1])
        gateway._account()
        gateway.writer._pending.clear()  # the writer is not started here: keep its queue from growing

    batch: list[object] = []
    finish()

    print(f"{calls:,} calls per step; best of 3 runs")
    steps: dict[str, Callable[[], object]] = {
        AUTHN: lambda: gateway.authn.authenticate(fields_of(headers)),
        DECODE: lambda: decode_request("messages", "r", "/v1/messages", b"", headers, body),
        PREFIX: lambda: prompt_prefix(ctx.prompt, ctx.body),  # type: ignore[arg-type]
        POLICY: lambda: gateway._admit(ctx.principal, ctx),  # type: ignore[arg-type]
        ROUTE: lambda: gateway.router.route(ctx.model, time.monotonic(), None, ctx.prefix, "bench"),
        SHAPE_SIGN: lambda: gateway.signer.sign(shape(ctx, state.upstream)),
        HEADERS: lambda: parse_ratelimit_headers(received, time.monotonic(), time.time()),
        USAGE: lambda: usage_from_json(ANSWER),
        FINISH: finish,
        ACCOUNT: account,
        RECORD: lambda: usage_record(ctx, result, decision.trace.to_json()),
        PRICE: lambda: gateway._price(ctx, state.upstream.id, 200, billable(usage)),
    }
    costs = {name: timed(name, call, calls) for name, call in steps.items()}
    print(f"{sum(costs[name] for name in TOTALLED):8.2f} µs  all steps above (not counting the relay's own I/O)")
    return costs


class StepTimers:
    """Wraps the gateway's steps where it calls them, each in a timer of this thread's CPU clock."""

    def __init__(self) -> None:
        self.samples: defaultdict[str, list[int]] = defaultdict(list)
        self._undo: list[tuple[object, str, object]] = []

    def wrap(self, owner: object, attribute: str, step: str, items: Callable[[], int] | None = None) -> None:
        """`items`: for a step that handles a batch, how many requests the coming call handles (a sample is
        the time per request)."""
        real = getattr(owner, attribute)
        samples, clock = self.samples[step], time.thread_time_ns

        def timed_step(*args: Any, **kwargs: Any) -> Any:
            count = max(1, items()) if items is not None else 1
            began = clock()
            try:
                return real(*args, **kwargs)
            finally:
                samples.append((clock() - began) // count)

        self._undo.append((owner, attribute, owner.__dict__.get(attribute, real)))
        setattr(owner, attribute, timed_step)

    def restore(self) -> None:
        for owner, attribute, original in reversed(self._undo):
            setattr(owner, attribute, original)

    def median_us(self, step: str) -> float:
        return statistics.median(self.samples[step]) / 1000


@contextmanager
def aiohttp_request_timer(arm: list[str], samples: defaultdict[str, list[int]]) -> Iterator[None]:
    """Times aiohttp's own request (`ClientSession._request`, to the answer's headers) per arm."""
    real = aiohttp.ClientSession._request

    async def timed_request(self: aiohttp.ClientSession, *args: Any, **kwargs: Any) -> Any:
        began = time.thread_time_ns()
        try:
            return await real(self, *args, **kwargs)
        finally:
            samples[arm[0]].append(time.thread_time_ns() - began)

    aiohttp.ClientSession._request = timed_request  # type: ignore[method-assign]
    try:
        yield
    finally:
        aiohttp.ClientSession._request = real  # type: ignore[method-assign]


async def serve_one(app: Any, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    """One request through an ASGI app, as a server would hand it over."""
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # the client never leaves: the gateway's disconnect watcher waits here
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start" and message["status"] != 200:
            raise SystemExit(f"the request failed with status {message['status']}")

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/messages",
        "raw_path": b"/v1/messages",
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
    await app(scope, receive, send)


async def inside_requests(
    requests: int, body_kb: int | None = None
) -> tuple[StepTimers, dict[str, float], dict[str, float]]:
    """Per step, its thread-CPU time inside requests; per arm (gateway, bare proxy), the median request's
    and aiohttp's own."""
    port = procs.free_port()
    url = f"http://127.0.0.1:{port}"
    log = work_dir() / "mock.log"
    mock_cmd = [sys.executable, "-m", "poolgate", "mock-upstream", "--port", str(port), "--accept-any-key"]
    mock = procs.start("mock", [*mock_cmd, "--unlimited"], procs.LOAD_CORE, log)
    timers = StepTimers()
    try:
        if not await procs.wait_ready(mock, url + "/", 60):
            raise SystemExit(f"the mock upstream did not start: {mock.log_tail()}")
        gateway = Gateway(gateway_config(url))
        await gateway.startup()
        bare = BareProxy(url)
        bare.session = bare._new_session()
        for owner, attribute, step in (
            (gateway.authn, "authenticate", AUTHN),
            (gateway_module, "decode_request", DECODE),
            (gateway_module, "prompt_prefix", PREFIX),
            (gateway, "_admit", POLICY),
            (gateway.router, "route", ROUTE),
            (relay_module, "shape", SHAPE_SIGN),
            (gateway.signer, "sign", SHAPE_SIGN),
            (relay_module, "parse_ratelimit_headers", HEADERS),
            (relay_module, "usage_from_json", USAGE),
            (gateway, "_finish", FINISH),
            (gateway_module, "usage_record", RECORD),
            (gateway, "_price", PRICE),
        ):
            timers.wrap(owner, attribute, step)
        # A batch of the requests that finished in one turn of the event loop (one at a time here).
        timers.wrap(gateway, "_account", ACCOUNT, items=lambda: len(gateway._finished))
        # The wrk body, or a streaming one built like Claude Code's (`bigbody.py`).
        body = request_body(False) if body_kb is None else bigbody.body(body_kb, 0)
        headers = request_headers(body)
        arm = [""]
        whole: defaultdict[str, list[int]] = defaultdict(list)
        aiohttp_own: defaultdict[str, list[int]] = defaultdict(list)
        arms = {"gateway": gateway.asgi, "bare proxy": bare}  # `asgi`: what `poolgate serve` runs
        with aiohttp_request_timer(arm, aiohttp_own):
            rounds = 20
            for round_ in range(-1, rounds):  # a round to warm up first
                for name, app in arms.items():
                    arm[0] = name
                    for _ in range(max(1, requests // rounds)):
                        began = time.thread_time_ns()
                        await serve_one(app, body, headers)
                        if round_ >= 0:
                            whole[name].append(time.thread_time_ns() - began)
                if round_ < 0:
                    for samples in (*timers.samples.values(), *aiohttp_own.values()):
                        samples.clear()
        await bare.session.close()
        await gateway.shutdown()
    finally:
        timers.restore()
        procs.stop(mock)
    requests_us = {name: statistics.median(samples) / 1000 for name, samples in whole.items()}
    aiohttp_us = {name: statistics.median(samples) / 1000 for name, samples in aiohttp_own.items()}
    return timers, requests_us, aiohttp_us


def shape_and_sign(timers: StepTimers) -> None:
    """Shaping and signing are two calls inside requests, one step in the loop: count them as one per request."""
    samples = timers.samples[SHAPE_SIGN]
    timers.samples[SHAPE_SIGN] = [a + b for a, b in zip(samples[::2], samples[1::2], strict=False)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--in-situ", action="store_true", help="also time the steps inside real requests")
    parser.add_argument("--requests", type=int, default=2_000, help="requests per arm with --in-situ")
    parser.add_argument("--body-kb", type=int, help="with --in-situ: a Claude Code-like body of about this size")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {1})
    looped: list[dict[str, float]] = []

    async def in_a_running_loop() -> None:  # _finish arms the accounting timer on the running loop
        looped.append(in_a_loop(args.calls))

    asyncio.run(in_a_running_loop())
    loop = looped[0]
    if not args.in_situ:
        return
    measured: list[tuple[StepTimers, dict[str, float], dict[str, float]]] = []

    async def measure() -> None:
        measured.append(await inside_requests(args.requests, args.body_kb))

    run(measure)  # on uvloop, as the server runs
    timers, requests_us, aiohttp_us = measured[0]
    shape_and_sign(timers)
    print(f"\nInside requests ({args.requests:,} per arm, one at a time; medians of thread CPU time, µs):")
    print(f"{'in a loop':>10} {'inside':>8} {'ratio':>6}  step")
    for name, looped in loop.items():
        if not timers.samples[name]:  # not a step of these requests (a streamed body's answer is no JSON)
            print(f"{looped:10.2f} {'-':>8} {'-':>6}  {name}")
            continue
        inside = timers.median_us(name)
        print(f"{looped:10.2f} {inside:8.1f} {inside / looped:6.1f}  {name}")
    for name in requests_us:
        print(f"{name}: a request {requests_us[name]:.0f} µs, of which aiohttp's own request {aiohttp_us[name]:.0f} µs")


if __name__ == "__main__":
    main()
