"""A faithful, fast mock of the Anthropic Messages API, for the demo, the tests and the benchmarks."""

from poolgate.mock.config import DEMO_KEYS, Fault, MockConfig, MockKey
from poolgate.mock.server import MockServer, MockStats, create_mock_app, run_mock, start_mock

__all__ = [
    "DEMO_KEYS",
    "Fault",
    "MockConfig",
    "MockKey",
    "MockServer",
    "MockStats",
    "create_mock_app",
    "run_mock",
    "start_mock",
]
