"""What the mock upstream serves: its API keys, their limits, and the faults injected per key."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import msgspec
import yaml

from poolgate.mock.oauth import MockOAuthConfig
from poolgate.mock.strict import unknown_fields, unknown_message
from poolgate.mock.threads import ThreadLimits

DEMO_KEYS = ("sk-ant-api03-mock-key-1", "sk-ant-api03-mock-key-2", "sk-ant-api03-mock-key-3")

# Newest first, as the Models API lists them (see `server.model_json`).
DEFAULT_MODELS = (
    "claude-opus-5-5",
    "claude-sonnet-5-5",
    "claude-haiku-5-5",
    "claude-opus-5",
    "claude-sonnet-5",
    "claude-opus-4-6",
    "claude-sonnet-4-6",
    "claude-opus-4-5",
    "claude-haiku-4-5",
    "claude-sonnet-4-5",
)

UNLISTED_MODELS = ("claude-unpriced-9",)


# Longer than any wait a test may inject, and finite: infinity has no whole seconds for `retry-after` (every
# request under such a fault was a 500 and a traceback).
MAX_RETRY_AFTER_SECONDS = 100 * 365 * 86400


@dataclass
class Fault:
    """A misbehaviour for one key. Several fields may combine (e.g. a slow TTFB before a 529)."""

    status: Annotated[int, msgspec.Meta(ge=400, le=599)] | None = None  # answer this HTTP error, Anthropic's shape
    # `retry-after` seconds on a 429/529
    retry_after: Annotated[float, msgspec.Meta(ge=0, le=MAX_RETRY_AFTER_SECONDS)] | None = None
    reset_connection: bool = False  # abort the TCP connection without answering
    # Streaming: an `error` event after this many events.
    midstream_error_after: Annotated[int, msgspec.Meta(ge=0)] | None = None
    ttfb_ms: Annotated[float, msgspec.Meta(ge=0)] = 0.0  # delay before the response headers
    tokens_per_second: Annotated[float, msgspec.Meta(gt=0)] | None = None  # pace streamed text deltas
    times: Annotated[int, msgspec.Meta(ge=1)] | None = None  # apply to the next N requests only; None = until cleared

    @property
    def stream_only(self) -> bool:
        """Whether it changes streamed answers only (an error mid-stream, a pace), which is the only kind
        of request it applies to and that its `times` counts."""
        return self.status is None and not self.reset_connection and not self.ttfb_ms


@dataclass
class MockKey:
    # An API key of Anthropic's top usage tier, for one model.
    requests_per_minute: int = 4000
    tokens_per_minute: int = 2_000_000
    input_tokens_per_minute: int = 2_000_000
    output_tokens_per_minute: int = 400_000
    fault: Fault | None = None

    @classmethod
    def unlimited(cls) -> MockKey:
        big = 10**12
        return cls(big, big, big, big)

    @classmethod
    def roomy(cls) -> MockKey:
        """Limits a minute of the most one machine can send stays within (see `MockConfig.demo`)."""
        return cls(1_000_000, 4_000_000_000, 4_000_000_000, 800_000_000)


@dataclass
class MockConfig:
    keys: dict[str, MockKey] = field(default_factory=dict)
    accept_any_key: bool = False
    output_tokens: Annotated[int, msgspec.Meta(ge=1)] = 16  # tokens per answer, capped by the request's max_tokens
    # Shorter prefixes are never cached. None: each model's own minimum, as on the real API (see
    # `models.min_cacheable_tokens`); a number is every model's (tests and benchmarks cache small prompts).
    min_cacheable_tokens: int | None = None
    # Answered besides any real Claude id (see `strict.CLAUDE_MODEL`) and listed by /v1/models, newest first.
    models: tuple[str, ...] = DEFAULT_MODELS
    # Answered but not listed (as the API answers aliases it does not list). The default is a model no price
    # list knows, for showing (and testing) how the gateway records an unknown cost.
    unlisted_models: tuple[str, ...] = UNLISTED_MODELS
    # gzip JSON answers for clients that accept it (the real API may); "always": whatever they accept.
    compress: bool | Literal["always"] = False
    cache_entries_per_key: int = 10_000  # each key has a cache per model
    # Limits and standing fault of each key admitted by accept_any_key (the fault: each key its own copy).
    default_key: MockKey = field(default_factory=MockKey)
    # Claude subscription accounts: token lifetime, 5h/7d budgets, what subscription requests must look like.
    oauth: MockOAuthConfig = field(default_factory=MockOAuthConfig)
    # How much of each key's message threads it holds (`threads`, `bytes`) and for how long (`ttl_seconds`).
    threads: ThreadLimits = field(default_factory=ThreadLimits)

    @classmethod
    def demo(cls) -> MockConfig:
        """Three fake API keys, sk-ant-api03-mock-key-1, -2 and -3, with limits a load test from one machine does
        not use up (the gateway relays some 3,000 requests a second on one core: with a real key's 4,000 a
        minute, the three were used up within seconds and a benchmark of the demo measured 529s for the rest of
        each minute). Their `anthropic-ratelimit-*` headers come as ever."""
        return cls(keys={key: MockKey.roomy() for key in DEMO_KEYS})


class MockConfigError(Exception):
    pass


def load_mock_config(path: Path) -> MockConfig:
    """A mock configuration from YAML: `keys` (each with its limits and a standing `fault`), `models`,
    `output_tokens`, `accept_any_key`, … — the fields of `MockConfig`, e.g.

        keys:
          sk-ant-api03-mock-key-1: {fault: {status: 529, retry_after: 2, times: 3}}
          sk-ant-api03-mock-key-2: {requests_per_minute: 50}

    A key nothing reads (a typo) is an error naming it, as are wrong types. Without `keys` (and without
    `accept_any_key`) it serves the three demo keys, as it does without a file.
    """
    # The gateway's reading and wording (`mock.yaml:3: not valid YAML: …`): PyYAML's own message spread the
    # quoted line, a caret and `in "<unicode string>"` marks over one line.
    from poolgate.config import ConfigError, read_text, yaml_error

    try:
        data = yaml.safe_load(read_text(path)) or {}
    except ConfigError as exc:
        raise MockConfigError(str(exc)) from None
    except yaml.YAMLError as exc:
        raise MockConfigError(yaml_error(exc, str(path))) from None
    except RecursionError:  # some 500 levels of `[`: YAML's composer recurses (a traceback)
        raise MockConfigError(f"{path}: not valid YAML: nested too deeply") from None
    if not isinstance(data, dict):
        raise MockConfigError(f"{path}: the top level must be a mapping of settings")
    # msgspec skips keys a dataclass has no field for: a typo (`kees:`, `stauts:`) would silently leave the
    # mock doing something else than the file says.
    unknown = unknown_fields(data, MockConfig)
    if unknown:
        raise MockConfigError(f"{path}: {unknown_message(unknown, 'key')}")
    if "keys" not in data and not data.get("accept_any_key"):
        data["keys"] = {key: {} for key in DEMO_KEYS}
    try:
        return msgspec.convert(data, MockConfig, strict=False)
    except msgspec.ValidationError as exc:
        raise MockConfigError(f"{path}: {exc}") from None
    except RecursionError:  # `a: &a [*a]`
        raise MockConfigError(f"{path}: an alias refers to the value it is in") from None
