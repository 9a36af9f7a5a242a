"""What each per-request step of the gateway costs, timed in process (µs per call, best of 3 runs).

    python bench/stage_costs.py [--calls 20000]

The core benchmark says how much slower than a bare proxy the gateway is; this says where the difference
goes. Each step is called the way the gateway calls it for one ~5 KB non-streaming request (two upstream
accounts, no network): authn, decoding, prompt analysis, policy, routing with its trace, shaping and
signing, reading the answer's rate-limit headers and usage, and the accounting after the answer (pricing,
usage record, observers). Sampling profilers attribute this asynchronous code poorly; calling each step
many times does not.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from multidict import CIMultiDict, CIMultiDictProxy

from load import request_body
from poolgate.api.anthropic import decode_request
from poolgate.app import ADMITTED, Gateway, billable, usage_record
from poolgate.cache.breakpoints import prompt_prefix
from poolgate.config import GatewayConfig, StaticKey, UpstreamConfig
from poolgate.lifecycle.context import Usage
from poolgate.lifecycle.relay import RelayResult
from poolgate.lifecycle.shape import shape
from poolgate.lifecycle.usage import usage_from_json
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


async def main(calls: int) -> None:
    data_dir = Path(tempfile.mkdtemp(prefix="poolgate-stage-costs-"))
    config = GatewayConfig(
        data_dir=data_dir,
        upstreams=tuple(
            UpstreamConfig(id=name, base_url="http://127.0.0.1:1", api_key=f"sk-ant-api03-{name}") for name in "ab"
        ),
        keys=(StaticKey(name="bench", key=KEY),),
    )
    gateway = Gateway(config)
    body = request_body(False)
    headers = [
        (b"content-type", b"application/json"),
        (b"anthropic-version", b"2023-06-01"),
        (b"x-api-key", KEY.encode()),
        (b"content-length", str(len(body)).encode()),
    ]
    ctx = decode_request("messages", "req_1", "/v1/messages", b"", headers, body)
    assert ctx.prompt is not None
    ctx.principal = gateway.authn.authenticate(headers)
    ctx.prefix = prompt_prefix(ctx.prompt, ctx.body)
    decision = gateway.router.route(ctx.model, time.monotonic(), None, ctx.prefix, "bench")
    state = decision.order[0]
    received = answer_headers()
    usage = Usage(input_tokens=1200, output_tokens=20)
    result = RelayResult(upstream_id=state.upstream.id, status=200, usage=usage, first_byte_at=time.perf_counter())

    def finish() -> None:
        gateway._finish(ctx, result, decision.trace, ADMITTED)
        gateway.writer._pending.clear()  # the writer is not started here: keep its queue from growing

    total = 0.0
    print(f"{calls:,} calls per step; best of 3 runs")
    total += timed("authn (gateway key → principal)", lambda: gateway.authn.authenticate(headers), calls)
    total += timed(
        "decode the request", lambda: decode_request("messages", "r", "/v1/messages", b"", headers, body), calls
    )
    total += timed("prompt analysis (cache breakpoints)", lambda: prompt_prefix(ctx.prompt, ctx.body), calls)
    total += timed("policy (admission)", lambda: gateway._admit(ctx.principal, ctx), calls)  # type: ignore[arg-type]
    total += timed(
        "route (filters, scoring, trace)",
        lambda: gateway.router.route(ctx.model, time.monotonic(), None, ctx.prefix, "bench"),
        calls,
    )
    total += timed("shape + sign", lambda: gateway.signer.sign(shape(ctx, state.upstream)), calls)
    total += timed(
        "rate-limit headers of the answer",
        lambda: parse_ratelimit_headers(received, time.monotonic(), time.time()),
        calls,
    )
    total += timed("usage of a JSON answer", lambda: usage_from_json(ANSWER), calls)
    total += timed("accounting after the answer (_finish)", finish, calls)
    timed(
        "  of which: the usage record (with the trace as JSON)",
        lambda: usage_record(ctx, result, decision.trace),
        calls,
    )
    timed("  of which: the price", lambda: gateway._price(ctx, state.upstream.id, 200, billable(usage)), calls)
    print(f"{total:8.2f} µs  all steps above (not counting the relay's own I/O)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=20_000)
    asyncio.run(main(parser.parse_args().calls))
