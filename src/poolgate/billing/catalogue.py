"""The price catalogue: list prices shipped as a dated data file, overridable per model and per upstream.

A model id resolves to a price in this order — an upstream override, a model override, the shipped
row — each tried with the id exactly as sent, then in its canonical form (dated, region-prefixed and
versioned ids price as their family: `claude-sonnet-4-5-20250929`, `us.anthropic.claude-…-v1:0`,
`gpt-4o-2024-08-06`), then as an alias (Claude Code's `opus` / `sonnet` / `haiku` → the newest
generation). A model that resolves to nothing has **no** price: its cost is recorded as unknown
(`Cost.micro_usd is None`), never as zero.

A model may have several rows with different `effective_from` dates; the row in force at the time of
the request applies, so a price change announced in advance is just another row in the file.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, date, datetime
from decimal import Decimal
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Final

from pydantic import ValidationError

from poolgate.billing.config import PerTokenPriceConfig, PriceFile, PriceOverrides, parse_price, validation_problems
from poolgate.billing.pricing import PER_MILLION, Cost, PerTokenPrice, PriceUnknown, pico_of_billable, round_half_up
from poolgate.billing.values import BillableUsage

# (effective-from Unix time, price), ascending; the first row usually starts at -inf.
Rows = tuple[tuple[float, PerTokenPrice], ...]
PriceSpec = PerTokenPriceConfig | PerTokenPrice | Mapping[str, Any]

WILDCARD: Final = "*"  # in an upstream's overrides: every model not listed otherwise
_ALIAS_FAMILY = re.compile(r"^claude-(opus|sonnet|haiku)-(\d+)(?:-(\d+))?$")
_SUFFIX_BRACKET = re.compile(r"\[[^\]]*\]$")  # Claude Code's "sonnet[1m]"
_PREFIX_BEDROCK = re.compile(r"^(?:[a-z]{2,6}\.)?anthropic\.")  # "anthropic.…", "us.anthropic.…"
_PREFIX_PROVIDER = re.compile(r"^(?:anthropic|openai)/")
_SUFFIX_VERSION = re.compile(r"-v\d+(?::\d+)?$")  # Bedrock's "-v1:0"
_SUFFIX_DATE = re.compile(r"(?:[-@]\d{8}|-\d{4}-\d{2}-\d{2}|-latest)$")
# Anthropic's alias of a model with no minor version: `claude-opus-4-0` is `claude-opus-4-20250514`.
_SUFFIX_NO_MINOR = re.compile(r"^(claude-[a-z]+-\d+)-0$")


class CatalogueError(ValueError):
    """A price file or override that cannot be used; the message names the bad entry."""


RESOLVED_CACHE_SIZE: Final = 4096


@lru_cache(maxsize=4096)
def canonical_model_id(model: str) -> str:
    """The family id a model id prices as. Only suffixes and prefixes with a fixed shape are removed, never
    arbitrary text, so `gpt-4o-mini` can never collapse into `gpt-4o`. Cached: clients repeat ids."""
    s = model.strip().lower()
    s = _SUFFIX_BRACKET.sub("", s)
    s = _PREFIX_BEDROCK.sub("", s)
    s = _PREFIX_PROVIDER.sub("", s)
    s = _SUFFIX_VERSION.sub("", s)
    return _SUFFIX_NO_MINOR.sub(r"\1", _SUFFIX_DATE.sub("", s))


def is_claude(model: str) -> bool:
    """Whether a model id names a Claude model (in any of the forms `canonical_model_id` reads)."""
    return canonical_model_id(model).startswith("claude-")


def newest_aliases(model_ids: Any) -> dict[str, str]:
    """`opus` / `sonnet` / `haiku` → the highest `claude-<family>-<major>[-<minor>]` id present."""
    best: dict[str, tuple[tuple[int, int], str]] = {}
    for model in model_ids:
        match = _ALIAS_FAMILY.match(model)
        if match is None:
            continue
        family, major, minor = match.group(1), int(match.group(2)), int(match.group(3) or 0)
        if family not in best or (major, minor) > best[family][0]:
            best[family] = ((major, minor), model)
    return {family: model for family, (_, model) in best.items()}


# ------------------------------------------------------------------------------------ the data file


def _start_of(day: date | None) -> float:
    return float("-inf") if day is None else datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()


def _digest(override: Mapping[str, Any]) -> str:
    canonical = json.dumps(override, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:8]


def _overridden(rows: Rows, digest: str) -> Rows:
    """`rows` with the digest of an override that picked them in their pricing version."""
    return tuple((start, replace(price, version=f"{price.version}+cfg.{digest}")) for start, price in rows)


class InForce:
    """A price and the span of time it is in force for, [since, until) in Unix time."""

    __slots__ = ("price", "since", "until")

    def __init__(self, price: PerTokenPrice | None, since: float, until: float) -> None:
        self.price = price
        self.since = since
        self.until = until


class Catalogue:
    """Immutable: `with_overrides` returns a new catalogue, so a config reload swaps one reference."""

    __slots__ = (
        "_aliases",
        "_configured_aliases",
        "_in_force",
        "_resolved",
        "_table",
        "_upstreams",
        "as_of",
        "currency",
        "version",
    )

    def __init__(
        self,
        version: str,
        as_of: date,
        table: dict[str, Rows],
        aliases: dict[str, str],
        upstreams: dict[str, dict[str, Rows]] | None = None,
        currency: str = "USD",
        configured_aliases: frozenset[str] = frozenset(),
    ) -> None:
        self.version = version
        self.as_of = as_of
        self.currency = currency
        self._table = table
        self._upstreams = upstreams or {}
        # What (model, upstream) resolved to: every answered request is priced, and clients repeat ids.
        self._resolved: dict[tuple[str, str | None], tuple[str, Rows] | None] = {}
        # The price last found in force for a model on an upstream, by upstream then model (two lookups of a
        # string cost less than one of a tuple, which is hashed afresh), and from when until when it is: one
        # lookup per request instead of resolving and picking its row (`price_for`).
        self._in_force: dict[str | None, dict[str, InForce]] = {}
        self._aliases: dict[str, str] = {}
        for alias, target in aliases.items():
            key = next((k for k in (target.lower(), canonical_model_id(target)) if k in table), None)
            if key is None:
                raise CatalogueError(f"alias {alias!r} points at {target!r}, which has no price")
            self._aliases[alias.lower()] = key
        # The aliases of the config (`prices.aliases`), by the digest their prices' version carries: one that
        # repriced a model said the catalogue's version, as if at list price.
        self._configured_aliases = {
            alias: _digest({"alias": alias, "model": self._aliases[alias]}) for alias in configured_aliases
        }

    # ----------------------------------------------------------------------------------- loading

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> Catalogue:
        try:
            parsed = PriceFile.model_validate(data)
        except ValidationError as exc:
            raise CatalogueError(f"invalid price file: {validation_problems(exc)}") from None
        grouped: dict[str, list[tuple[float, PerTokenPrice]]] = {}
        for row in parsed.prices:
            where = f"price row {row.ids}"
            try:
                claude = all(is_claude(model) for model in row.ids)
                price = row.merge_onto(None, parsed.version, where, parsed.currency, claude)
            except ValueError as exc:
                raise CatalogueError(str(exc)) from exc
            for model in row.ids:
                grouped.setdefault(canonical_model_id(model), []).append((_start_of(row.effective_from), price))
        table: dict[str, Rows] = {}
        for model, rows in grouped.items():
            starts = [start for start, _ in rows]
            if len(set(starts)) != len(starts):
                raise CatalogueError(f"{model} has two price rows with the same effective_from")
            table[model] = tuple(sorted(rows, key=lambda r: r[0]))
        aliases = newest_aliases(table) | parsed.aliases
        return cls(parsed.version, parsed.as_of, table, aliases, currency=parsed.currency)

    @classmethod
    def from_file(cls, path: str | Path) -> Catalogue:
        """A user's own price file in the shipped format (JSON; numbers are read as exact decimals). Every
        error names the file: one that is not JSON said only "Expecting value: line 1 column 1"."""
        try:
            return cls.from_data(json.loads(Path(path).read_text(encoding="utf-8"), parse_float=Decimal))
        except json.JSONDecodeError as exc:
            raise CatalogueError(f"{path}: not JSON: {exc}") from exc
        except (OSError, ValueError) as exc:  # CatalogueError and UnicodeDecodeError included
            raise CatalogueError(f"{path}: {exc}") from exc

    @classmethod
    def load_default(cls) -> Catalogue:
        return _default_catalogue()

    # --------------------------------------------------------------------------------- overrides

    def with_overrides(
        self,
        models: Mapping[str, PriceSpec] | None = None,
        upstreams: Mapping[str, Mapping[str, PriceSpec]] | None = None,
        aliases: Mapping[str, str] | None = None,
    ) -> Catalogue:
        """A copy with config overrides applied. A partial override changes only the rates it names (of
        every dated row of that model); an override for a model the catalogue lacks must be complete.
        Upstream overrides apply on top of model overrides, for requests routed to that upstream only;
        their `"*"` entry (complete, standalone) prices every model not listed for that upstream, e.g. a
        self-hosted upstream that costs nothing per token."""
        table = dict(self._table)
        for model, spec in (models or {}).items():
            key = model.strip().lower()
            base = self._find(table, key)
            table[key] = self._merge(spec, base[1] if base else None, f"prices.models.{model}", is_claude(key))
        merged_aliases = {**self._aliases, **(aliases or {})}
        configured = frozenset([*self._configured_aliases, *(alias.lower() for alias in aliases or {})])
        resolver = Catalogue(self.version, self.as_of, table, merged_aliases, currency=self.currency)
        upstream_tables = {uid: dict(rows) for uid, rows in self._upstreams.items()}
        for upstream_id, specs in (upstreams or {}).items():
            own = upstream_tables.setdefault(upstream_id, {})
            for model, spec in specs.items():
                key = model.strip().lower()
                base = None if key == WILDCARD else resolver._find(table, key)
                where = f"prices.upstreams.{upstream_id}.{model}"
                own[key] = self._merge(spec, base[1] if base else None, where, key != WILDCARD and is_claude(key))
        return Catalogue(self.version, self.as_of, table, merged_aliases, upstream_tables, self.currency, configured)

    @classmethod
    def from_config(cls, overrides: PriceOverrides, base: Catalogue | None = None) -> Catalogue:
        base = base or cls.load_default()
        return base.with_overrides(overrides.models, overrides.upstreams, overrides.aliases)

    def _merge(self, spec: PriceSpec, base: Rows | None, where: str, claude: bool = False) -> Rows:
        if isinstance(spec, PerTokenPrice):
            return ((float("-inf"), spec),)
        try:
            cfg = parse_price(spec)
            version = f"{self.version}+cfg.{_digest(cfg.model_dump(mode='json', exclude_none=True))}"
            if base is None:
                return ((float("-inf"), cfg.merge_onto(None, version, where, claude=claude)),)
            return tuple((start, cfg.merge_onto(price, version, where)) for start, price in base)
        except (ValidationError, ValueError) as exc:
            # merge_onto's messages already start with `where`.
            text = str(exc)
            raise CatalogueError(text if text.startswith(where) else f"{where}: {text}") from exc

    # ---------------------------------------------------------------------------------- lookups

    def _find(self, table: Mapping[str, Rows], model: str) -> tuple[str, Rows] | None:
        rows = table.get(model)
        if rows is not None:
            return model, rows
        key = canonical_model_id(model)
        rows = table.get(key)
        if rows is not None:
            return key, rows
        target = self._aliases.get(key)
        if target is not None and (rows := table.get(target)) is not None:
            digest = self._configured_aliases.get(key)
            return target, rows if digest is None else _overridden(rows, digest)
        return None

    def _resolve(self, model: str, upstream_id: str | None) -> tuple[str, Rows] | None:
        key = (model, upstream_id)
        try:
            return self._resolved[key]
        except KeyError:
            pass
        if len(self._resolved) >= RESOLVED_CACHE_SIZE:
            # Model ids are caller-chosen: bound the memory they can take.
            self._resolved.clear()
        found = self._resolved[key] = self._lookup(model.lower(), upstream_id)
        return found

    def _lookup(self, model: str, upstream_id: str | None) -> tuple[str, Rows] | None:
        if upstream_id is not None and (own := self._upstreams.get(upstream_id)):
            found = self._find(own, model)
            if found is not None:
                return found
            if WILDCARD in own:
                return canonical_model_id(model), own[WILDCARD]
        return self._find(self._table, model)

    def resolve(self, model: str, upstream_id: str | None = None) -> str | None:
        """The catalogue id `model` prices as (e.g. "sonnet" → "claude-sonnet-5-5"), or None."""
        found = self._resolve(model, upstream_id)
        return found[0] if found else None

    def price_for(self, model: str, upstream_id: str | None = None, at: float | None = None) -> PerTokenPrice | None:
        """The price in force at `at` (Unix time, default now) for `model` on `upstream_id`; None = unknown."""
        if at is None:
            at = time.time()
        prices = self._in_force.get(upstream_id)
        held = prices.get(model) if prices is not None else None
        if held is not None and held.since <= at < held.until:
            return held.price
        return self._price_at(model, upstream_id, at)

    def _price_at(self, model: str, upstream_id: str | None, at: float) -> PerTokenPrice | None:
        """The price in force at `at` and the span it is in force for, remembered for `price_for`."""
        found = self._resolve(model, upstream_id)
        price, since, until = None, -math.inf, math.inf
        for start, row in found[1] if found is not None else ():  # ascending: the last row started is in force
            if start > at:
                until = start
                break
            price, since = row, start
        prices = self._in_force.get(upstream_id)
        if prices is None:  # upstreams are the pool's, a bounded set
            prices = self._in_force[upstream_id] = {}
        elif len(prices) >= RESOLVED_CACHE_SIZE:
            prices.clear()  # model ids are caller-chosen, as in `_resolve`
        prices[model] = InForce(price, since, until)
        return price

    def cost(self, model: str, usage: BillableUsage, upstream_id: str | None = None, at: float | None = None) -> Cost:
        found = self._resolve(model, upstream_id)
        price = self.price_for(model, upstream_id, at) if found else None
        if found is None or price is None:
            return Cost(micro_usd=None, currency=self.currency, pricing_version=self.version)
        try:
            exact = pico_of_billable(price, usage)
        except PriceUnknown:  # web searches without a rate in the price's currency, a mode without its premium
            version = price.version + usage.premium_label
            return Cost(micro_usd=None, currency=price.currency, pricing_version=version, priced_as=found[0])
        return Cost(
            micro_usd=round_half_up(exact, PER_MILLION),
            currency=price.currency,
            pricing_version=price.version + usage.premium_label,
            priced_as=found[0],
            pico_exact=exact,
            breakdown=price.breakdown(usage),
        )

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(sorted(self._table))

    @property
    def aliases(self) -> dict[str, str]:
        return dict(self._aliases)


@lru_cache(maxsize=1)
def _default_catalogue() -> Catalogue:
    raw = resources.files("poolgate.billing").joinpath("prices.json").read_text(encoding="utf-8")
    return Catalogue.from_data(json.loads(raw, parse_float=Decimal))
