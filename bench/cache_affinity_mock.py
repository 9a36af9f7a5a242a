"""The mock upstream for cache_affinity.py: the gateway arms' keys with finite (by default generous) rate
limits, so that the router sees real `anthropic-ratelimit-*` headers, and the ideal arm's keys with none.

    python bench/cache_affinity_mock.py --port 9100 --keys 4 [--input-tpm 2000000]
"""

from __future__ import annotations

import argparse

from poolgate.mock import MockConfig, MockKey, run_mock
from poolgate.serve import bind

DEFAULTS = MockKey()


def gateway_key(index: int) -> str:
    return f"sk-ant-api03-cache-affinity-key-{index}"


def ideal_key(index: int) -> str:
    return f"sk-ant-api03-cache-affinity-ideal-{index}"


def config(keys: int, input_tpm: int) -> MockConfig:
    limited = MockKey(
        requests_per_minute=DEFAULTS.requests_per_minute,
        tokens_per_minute=input_tpm + DEFAULTS.output_tokens_per_minute,
        input_tokens_per_minute=input_tpm,
        output_tokens_per_minute=DEFAULTS.output_tokens_per_minute,
    )
    served = {gateway_key(index): MockKey(**vars(limited)) for index in range(keys)}
    served.update({ideal_key(index): MockKey.unlimited() for index in range(keys)})
    return MockConfig(keys=served)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--keys", type=int, required=True)
    parser.add_argument("--input-tpm", type=int, default=DEFAULTS.input_tokens_per_minute)
    args = parser.parse_args()
    run_mock(config(args.keys, args.input_tpm), bind("127.0.0.1", args.port))


if __name__ == "__main__":
    main()
