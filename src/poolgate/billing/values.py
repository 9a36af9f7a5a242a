"""The values pricing reads and returns: what a request used (`BillableUsage`) and what it cost (`Priced`).

msgspec Structs, made for every answered request, kept out of the modules setup.py compiles: mypyc drops a
Struct's class options (`frozen`, `gc=False`, `omit_defaults`) and its field types.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgspec


@dataclass(frozen=True, slots=True)
class ImageCount:
    """`count` images generated at one resolution and quality (e.g. "1024x1024", "hd")."""

    resolution: str
    quality: str
    count: int = 1


class BillableUsage(msgspec.Struct, frozen=True, gc=False):
    """Everything any pricing model may meter for one request; each model reads only its own fields.
    (A Struct: one is made for every answered request, at a tenth of a frozen dataclass's cost.)

    `input_tokens` is the *uncached* part of the prompt (Anthropic's meaning; for OpenAI subtract
    `cached_tokens` from `prompt_tokens` first). `thinking_tokens` are billed *on top of* output, so
    pass 0 when the provider already counts them inside `output_tokens` (Anthropic and OpenAI do).
    """

    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_5m: int = 0
    cache_creation_1h: int = 0
    cache_read: int = 0
    thinking_tokens: int = 0
    requests: int = 1
    # Server-side web searches the upstream ran for the request (billed per search).
    web_searches: int = 0
    input_chars: int = 0
    output_chars: int = 0
    duration_ms: int = 0
    # Why its counts are unknown, if they are, and so its cost: the pricing version its cost is recorded with
    # (`usage-unreported`: the answer reported no usage, see `Usage.unreported`; `usage-incomplete`: inferences
    # billed apart ran whose tokens never came, see `Usage.incomplete`). One field, read once per answer.
    unknown: str = ""
    images: tuple[ImageCount, ...] = ()
    # It ran in fast mode, or inferred in the US only: a price's token rates bear its premium for them
    # (`PerTokenPrice.premium`).
    fast: bool = False
    us_only: bool = False
    # Of the counts above, a server-side compaction's: an inference of its own on the request's model, whose
    # prompt's size (not its sum with the request's) picks a long-context price's rates.
    compaction: BillableUsage | None = None
    # Sub-inferences the request ran on other models (the advisor tool's), each billed at its model's rates;
    # not in the counts above.
    advisors: tuple[ModelUsage, ...] = ()

    @property
    def prompt_tokens(self) -> int:
        return self.input_tokens + self.cache_creation_5m + self.cache_creation_1h + self.cache_read

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.output_tokens + self.thinking_tokens

    @property
    def premium_label(self) -> str:
        """What a pricing version adds for the premiums a token price applied (`+speed:fast`)."""
        if not (self.fast or self.us_only):
            return ""
        return ("+speed:fast" if self.fast else "") + ("+inference_geo:us" if self.us_only else "")

    @classmethod
    def from_anthropic(cls, usage: Mapping[str, Any], requests: int = 1) -> BillableUsage:
        """From an Anthropic `usage` object. Cache writes without the 5m/1h split count as 5m (the default
        TTL); a split that adds up to less than the total leaves the rest as 5m too, so no write goes unbilled.
        """
        written = _count(usage, "cache_creation_input_tokens")
        split = usage.get("cache_creation")
        split = split if isinstance(split, Mapping) else {}
        one_hour = _count(split, "ephemeral_1h_input_tokens")
        five_min = max(_count(split, "ephemeral_5m_input_tokens"), written - one_hour)
        server = usage.get("server_tool_use")
        return cls(
            input_tokens=_count(usage, "input_tokens"),
            output_tokens=_count(usage, "output_tokens"),
            cache_creation_5m=five_min,
            cache_creation_1h=one_hour,
            cache_read=_count(usage, "cache_read_input_tokens"),
            requests=requests,
            web_searches=_count(server, "web_search_requests") if isinstance(server, Mapping) else 0,
            fast=usage.get("speed") == "fast",
            us_only=usage.get("inference_geo") == "us",
        )


def _count(mapping: Mapping[str, Any], name: str) -> int:
    """A token count of an Anthropic `usage` object: a positive integer, else none."""
    value = mapping.get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


class ModelUsage(msgspec.Struct, frozen=True, gc=False):
    """What a request spent on another model than its own (an advisor's sub-inference)."""

    model: str
    usage: BillableUsage


class Priced(msgspec.Struct, frozen=True, gc=False):
    """A finished request's cost: µ of `currency` (None = unknown price) and the price that applied."""

    micro: int | None
    currency: str | None
    version: str | None
