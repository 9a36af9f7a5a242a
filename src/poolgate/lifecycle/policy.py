"""policy: principal + request → admitted, or an Anthropic-shaped refusal. Runs after authn, before routing.

In order, each check refusing with its own status:
  1. model allow-list globs       → 403 permission_error naming the model
  2. quotas (requests/tokens)     → 429 rate_limit_error + retry-after + x-poolgate-quota-* headers
  3. budget (µUSD, scope, range)  → 402 billing_error + x-should-retry: false (+ retry-after when it resets);
                                     429 rate_limit_error + a short retry-after when only requests in flight hold it
Nothing is counted or reserved unless every check passes.

A principal without claims costs one attribute check: the hot path for unrestricted keys stays as it was.
All state is in memory; `load_spend` seeds budgets from the ledger so spend survives restarts.
`/v1/messages/count_tokens` is free upstream, so it is checked against the model allow-list only.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from fnmatch import fnmatchcase
from typing import Any, Final, TypeVar

from xxhash import xxh3_128_digest

from poolgate.api.errors import ApiError
from poolgate.api.escapes import hides_words
from poolgate.api.images import NO_IMAGES, ImageLoad, images_in_content, images_named_in
from poolgate.api.tools import NOTHING_OFFERED, Advisor, Offered, offered_tools
from poolgate.billing.book import ChannelBook
from poolgate.lifecycle.budgets import Budgets, BudgetStatus, BudgetTicket, SpendRow
from poolgate.lifecycle.context import Principal, RequestContext, Usage
from poolgate.lifecycle.quotas import PrincipalQuotas, Quotas

__all__ = [
    "ADMITTED",
    "Admission",
    "Policy",
    "SpendRow",
    "advisors_estimate",
    "allowed_models",
    "budget_estimate",
    "estimate_tokens",
    "model_allowed",
    "offered",
]

M = TypeVar("M")

# The "nothing" sentinels of the request path, as statics of this compiled module: a name imported from a module
# not compiled is looked up in this module's globals at every use (~130 instructions; five a request).
_NO_IMAGES: Final = NO_IMAGES
_NOTHING_OFFERED: Final = NOTHING_OFFERED


class Admission:
    """An admitted request's hold on its principal's quotas and budget, released by `Policy.settle`.

    `head_lines` (quota and budget state, `api.http.HEAD_LINES`) are meant for the response. (A class of this
    compiled module, not a Struct: the policy makes and reads it in C, where each field of a Struct was a
    generic lookup.)"""

    def __init__(
        self,
        principal: Principal | None,
        quotas: PrincipalQuotas | None = None,
        budget: BudgetTicket | None = None,
        head_lines: bytes = b"",
    ) -> None:
        self.principal = principal
        self.quotas = quotas
        self.budget = budget
        self.head_lines = head_lines
        self.settled = False


# The admission of every request with nothing to enforce: shared, never mutated (settle ignores it).
ADMITTED: Final = Admission(None)


# Whether a model is on an allow-list, by allow-list then model: a dict of this compiled module costs a third
# of an `lru_cache` call (~1,000 instructions a request). Bounded: model ids are the callers' to choose.
_MATCHES_MEMO_SIZE: Final = 4096
_matched: Final[dict[tuple[str, ...], dict[str, bool]]] = {}


def _matches(globs: tuple[str, ...], model: str) -> bool:
    by_model = _matched.get(globs)
    if by_model is None:
        if len(_matched) >= _MATCHES_MEMO_SIZE:
            _matched.clear()
        by_model = _matched[globs] = {}
    found = by_model.get(model)
    if found is None:
        if len(by_model) >= _MATCHES_MEMO_SIZE:
            by_model.clear()
        found = by_model[model] = any(fnmatchcase(model, glob) for glob in globs)
    return found


def model_allowed(principal: Principal, model: str) -> bool:
    globs = principal.claims.models
    return not globs or _matches(globs, model)


def allowed_models(principal: Principal, models: Sequence[M]) -> list[M]:
    """The entries of a model list the principal may use: `/v1/models` data dicts (by their "id") or ids."""
    if not principal.claims.models:
        return list(models)
    return [m for m in models if model_allowed(principal, m["id"] if isinstance(m, dict) else str(m))]


# JSON request bytes per prompt token, low on purpose: English prose runs ~4 bytes a token and code ~3, so
# dividing by 3 rarely underestimates. (Images are counted apart: see `api.images`.)
BYTES_PER_TOKEN: Final = 3
_LIST_START: Final = ord("[")


def estimate_tokens(ctx: RequestContext, output_cap: int | None = None) -> tuple[int, int]:
    """Bounds for a budget estimate before routing: (prompt tokens from the body size, each image at the most
    an image costs; max_tokens).

    Price both at the uncached rates to get an estimate that is an upper bound in practice, so that
    concurrent requests cannot overspend a budget (see lifecycle/budgets.py). `output_cap`
    (`billing.budget_output_tokens`) reserves at most that much output instead: no longer an upper bound,
    so each request in flight may overspend by the output it produces beyond the cap."""
    # Each attribute read once, here and below (see `Policy.admit`).
    output = ctx.max_tokens or 0
    size = len(ctx.body)
    images = _images(ctx)
    # Without images (the usual), their size alone: `ImageLoad.tokens` is an interpreted call.
    prompt = (size // BYTES_PER_TOKEN if images is _NO_IMAGES else images.tokens(size, BYTES_PER_TOKEN)) + 1
    return prompt, output if output_cap is None or output <= output_cap else output_cap


def _images(ctx: RequestContext) -> ImageLoad:
    """The request's images: as the cache analysis counted them (message by message, each message once in a
    session), else from its messages as decoded, else as the body names them."""
    prefix = ctx.prefix
    images = prefix.images if prefix is not None else None
    if images is not None:
        return images
    prompt = ctx.prompt
    messages = prompt.messages if prompt is not None else None
    if messages is None:  # too many to decode on the way in: not decoded here either
        return images_named_in(ctx.body)
    images = _NO_IMAGES
    for message in messages:
        content = message.content
        # Blocks (a JSON value's first byte `[`: never empty) may hold images; a string holds none, and is not
        # read (a scan of every byte of a 5 KB prompt took 3 µs).
        if memoryview(content)[0] == _LIST_START:
            images = images + images_in_content(bytes(content))
    return images


# What the tools offered cost beyond tokens, per distinct tools list (by digest): every request of a Claude Code
# session sends the same tens of KB of tools, which took ~25 µs a request to search; hashing them takes a tenth
# of that.
_OFFERED_MEMO_SIZE: Final = 1024
_offered: Final[dict[bytes, Offered]] = {}


def offered(ctx: RequestContext) -> Offered:
    """Upper bounds (allowances where a tool sets none) of what a request's server-side tools may run, each
    billed apart: the web searches (their tools' `max_uses`) and the advisors' consultations (see
    `api.tools`)."""
    tools = ctx.prompt.tools if ctx.prompt is not None else None
    if not tools:
        return _NOTHING_OFFERED
    key = ctx.prefix.tools_digest if ctx.prefix is not None and ctx.prefix.tools_digest else xxh3_128_digest(tools)
    found = _offered.get(key)
    if found is None:
        if len(_offered) >= _OFFERED_MEMO_SIZE:
            _offered.clear()
        found = _offered[key] = offered_tools(bytes(tools))
    return found


def budget_estimate(
    book: ChannelBook, ctx: RequestContext, output_cap: int | None, serving: tuple[str, ...]
) -> tuple[int | None, Offered]:
    """What a budget reserves for the request (see `ChannelBook.estimate`: on the accounts `serving` it, or at
    list price without them; None: no price), advisors' consultations included (`advisors_estimate`), and what
    its tools hold (see `offered`). Here rather than in the gateway: compiled, its calls cost no interpreted
    frame and no arguments boxed."""
    tokens_in, tokens_out = estimate_tokens(ctx, output_cap)
    tools = offered(ctx)
    at = ctx.started_at
    # (A request offering none of them, the usual, reads no field of `tools`: a Struct's, a generic lookup here.)
    searches = tools.web_searches if tools is not _NOTHING_OFFERED else 0
    estimate = book.estimate(
        ctx.model, tokens_in, tokens_out, cache_write_ttl(ctx), at, searches, serving, ctx.fast, ctx.us_only
    )
    if estimate is not None and tools is not _NOTHING_OFFERED and tools.advisors:
        estimate += advisors_estimate(book, tools.advisors, tokens_in + tokens_out, at, serving, ctx.us_only)
    return estimate, tools


def advisors_estimate(
    book: ChannelBook,
    advisors: tuple[Advisor, ...],
    conversation_tokens: int,
    at: float,
    serving: tuple[str, ...],
    us_only: bool,
) -> int:
    """An upper bound of what a request's advisors' consultations cost: each reads the whole conversation (at
    most the prompt, the executor's output and every consultation's advice: `conversation_tokens` plus their
    output) and writes its `max_tokens`, at its model's price on the accounts serving the request (see
    `ChannelBook.estimate`). An advisor whose model has no price adds nothing: the request's cost is then
    unknown, and charged its reservation."""
    advice = 0
    for advisor in advisors:
        advice += advisor.uses * advisor.max_tokens
    total = 0
    for advisor in advisors:
        each = book.estimate(
            advisor.model,
            conversation_tokens + advice,
            advisor.max_tokens,
            advisor.cache_write_ttl,
            at,
            0,
            serving,
            False,
            us_only,
        )
        if each is not None:
            total += advisor.uses * each
    return total


def cache_write_ttl(ctx: RequestContext) -> str | None:
    """The most expensive cache write the prompt may cause ("1h", "5m" or None), for cost estimates (an
    upper bound: budgets reserve it). Any 1-hour marker makes it 1h, also one the prompt analysis folds into a
    later 5-minute marker of the same message (`[{…1h}, {…5m}]` was estimated at the 5-minute rate), and so
    does a body that may hide one behind escapes (`hides_words`). From the prompt analysis where there is one
    (each of its units checked once, memoised): a scan of a Claude Code-sized body took ~30 µs per request."""
    prefix = ctx.prefix
    if prefix is not None and prefix.breakpoints:
        return "1h" if prefix.one_hour else "5m"
    body = ctx.body
    if hides_words(body):
        return "1h"
    # `find`, not `in`: see `usage._content_bytes`.
    if (prefix is not None and prefix.unmarked) or body.find(b'"cache_control"') < 0:
        return None
    # Markers the analysis did not take (a prompt of too many blocks), or no analysis.
    return "1h" if body.find(b'"1h"') >= 0 else "5m"


class Policy:
    def __init__(self) -> None:
        self.quotas = Quotas()
        self.budgets = Budgets()

    def admit(
        self,
        principal: Principal,
        ctx: RequestContext,
        estimated_cost_micro_usd: int | None,
        now: float,
        tools: Offered = NOTHING_OFFERED,
    ) -> Admission:
        """Admit the request or raise `ApiError` (403/429/402). `now` is epoch seconds (ctx.started_at keeps
        budget days aligned with the ledger's started_at). The estimate should be an upper bound of the cost;
        None (unpriced) reserves nothing. `tools`, what the estimate holds for them, only words a refusal."""
        # Each attribute read once (and here on in this module): compiled (mypyc), a read of an attribute of an
        # object not compiled (a Struct, a dataclass) is a generic lookup, ~160 instructions.
        claims = principal.claims
        if not claims.enforced:
            return ADMITTED
        models = claims.models
        if models and not _matches(models, ctx.model):
            allowed = ", ".join(models)
            raise ApiError(
                403,
                # Claude Code shows any 403 after "Please run /login": the message says the key is fine.
                f"Model {ctx.model!r} is not allowed for {principal.name!r} (allowed: {allowed}); the"
                f" {principal.credential} is "
                "valid: choose an allowed model (in Claude Code: /model or --model)",
                "permission_error",
            )
        if ctx.endpoint == "count_tokens":
            return ADMITTED
        rules = claims.quotas
        quotas = self.quotas.check(principal, now, rules) if rules else None
        limit = claims.budget_micro_usd
        ticket = None
        if limit is not None:
            ticket = self.budgets.reserve(principal, ctx.session_id, estimated_cost_micro_usd, now, tools)
        if quotas is None and ticket is None:
            return ADMITTED  # a model allow-list only: nothing to count or settle
        lines = self.quotas.count(quotas) if quotas is not None else b""
        if ticket is not None and limit is not None:
            lines = lines + self.budgets.lines(limit, ticket)  # `+=` on bytes is a generic call
        return Admission(principal, quotas if quotas is not None and quotas.has_tokens else None, ticket, lines)

    def settle(
        self,
        admission: Admission,
        actual_cost_micro_usd: int | None,
        usage: Usage | None,
        now: float,
    ) -> None:
        """Charge what the request really used: tokens to its quotas, cost to its budget (replacing the
        reservation). Call exactly once per admission, also for failed requests (usage None, cost 0 or None);
        later calls are ignored."""
        if admission.principal is None or admission.settled:
            return
        admission.settled = True
        quotas, budget = admission.quotas, admission.budget
        if quotas is not None and usage is not None:
            self.quotas.charge_tokens(
                quotas, usage.input_tokens + usage.cache_creation_input_tokens, usage.output_tokens, now
            )
        if budget is not None:
            self.budgets.settle(budget, actual_cost_micro_usd)

    def release(self, admission: Admission) -> int | None:
        """After `settle` failed (a fault, never a refusal): charge the budget what the request reserved, an upper
        bound of its cost (as for a cost unknown: a fault must not make a request free, nor hold its reservation
        until a restart). Returns that charge; None if no budget is still held (the quotas keep what was counted
        on admission)."""
        admission.settled = True
        budget = admission.budget
        if budget is None or not budget.open:
            return None
        self.budgets.settle(budget, budget.reserved)
        return budget.reserved

    def load_spend(self, rows: Iterable[SpendRow], now: float | None = None) -> None:
        """Seed budgets with the ledger's spend per (principal, session, UTC day); call before serving."""
        self.budgets.load_spend(rows, time.time() if now is None else now)

    def budget_status(self, principal: Principal, session_id: str | None, now: float) -> BudgetStatus | None:
        return self.budgets.status(principal, session_id, now)

    @staticmethod
    def allowed_models(principal: Principal, models: Sequence[Any]) -> list[Any]:
        return allowed_models(principal, models)
