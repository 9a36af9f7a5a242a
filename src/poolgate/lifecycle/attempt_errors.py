"""How an attempt at one account ended when it brought no answer to relay as it came: the errors the relay
raises inside an attempt and catches to choose between failing over, telling the client, and marking the
account (passed over before anything was sent; no answer; a stream that ended early; an answer only the
operator can cure, such as a rejected credential or a misconfigured base_url; a token that cannot be had now).
Each says, in its class, what the client is told and how the pool's 529 names it.
"""

from __future__ import annotations

from typing import ClassVar

from poolgate.api.errors import ERROR_MESSAGE_CAP, ApiError, no_upstream
from poolgate.api.http import FORBIDDEN_IN_HEADER
from poolgate.lifecycle.routing.trace import CONNECTION_ERROR
from poolgate.lifecycle.sign import SignedRequest

SHORT_OF_RESOURCES = "The gateway has too many connections open to take this request now: retry shortly"


class Skipped(ApiError):
    """An account passed over before anything was sent to it (its credential went, or cannot be had): no
    attempt of the request, and nothing the account answered."""

    def __init__(self, message: str, retry_after: float) -> None:
        error = no_upstream(retry_after, message)
        super().__init__(error.status, error.message, error.error_type, error.headers)


class ShortOfResources(Skipped):
    """Nothing sent, for want of this host's resources (see `Relay._short_of_resources`): no attempt, and no
    other account tried either: its connection would fail alike."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(SHORT_OF_RESOURCES, retry_after)


class Unanswered(ApiError):
    """An account that gave no answer: not reached, no answer in time, or its connection broke before the
    answer. The client gets the pool's 529 if no other account answers; the failed attempt (trace, access log,
    metric) says what happened instead (`kind`), lest it pass for the account's own 529 overload."""

    def __init__(self, retry_after: float, message: str, exc: BaseException | None = None) -> None:
        error = no_upstream(retry_after, message)
        super().__init__(error.status, error.message, error.error_type, error.headers)
        self.kind = unanswered_kind(exc)


def unanswered_kind(exc: BaseException | None) -> str:
    """A failed attempt's error type for an account that gave no answer (`exc`: what the connection raised)."""
    return "timeout_error" if isinstance(exc, TimeoutError) else CONNECTION_ERROR


class EndedEarly(Exception):
    """A stream closed before it said it was over."""


class OperatorsToFix(ApiError):
    """An account's answer only the operator can cure (a rejected credential, a base_url that is not the
    API's): another account's answer tells the client more, and when every account answers so, no retry
    helps (see `Relay._advise_retry`)."""

    # How the pool's 529 names the account's state (see `Relay._pools_wait`).
    named: ClassVar[str]


def operators_problem(upstream_id: str, problem: str, remedy: str) -> str:
    """What a client is told of an account only the operator can mend: which, what is wrong, and that its own key
    is fine (Claude Code adds "This is a server-side issue, usually temporary — try again in a moment")."""
    return (
        f"Upstream account {upstream_id} {problem}: your gateway key or token is fine; the gateway's operator has to"
        f" {remedy}"
    )


class Misconfigured(OperatorsToFix):
    """An account whose base_url does not lead to the API (it redirects, or answers 200 with something else)."""

    named = "misconfigured base_url"

    def __init__(self, upstream_id: str, what: str, headers: list[tuple[bytes, bytes]]) -> None:
        problem = f"answered {what}; its base_url is misconfigured"
        message = operators_problem(upstream_id, problem, "fix that account's base_url")
        super().__init__(502, message, "api_error", headers)


class CredentialRejected(OperatorsToFix):
    """An upstream's 401/403 (`seen`: its status and error type), answered to the client as a 500 (or as
    `answer`): for a subscription account, a refresh may cure it."""

    signed: SignedRequest | None = None
    named = "credential rejected"

    def __init__(self, seen: ApiError, upstream_id: str, answer: ApiError | None = None) -> None:
        problem = f"rejected the gateway's credential (HTTP {seen.status})"
        remedy = "give that account a valid key or token"
        answer = answer or ApiError(500, operators_problem(upstream_id, problem, remedy), "api_error")
        # Which account, and under which of its request ids (what Anthropic's support asks of a rejected key).
        answered = [field for field in seen.headers if field[0] == b"x-poolgate-upstream-request-id"]
        headers = [*answer.headers, (b"x-poolgate-upstream", upstream_id.encode()), *answered]
        super().__init__(answer.status, answer.message, answer.error_type, headers)
        self.seen = seen

    def problem(self) -> str:
        """What the log says of the account (never its credential)."""
        return f"rejected the gateway's credential (HTTP {self.seen.status})"


class ModelDenied(OperatorsToFix):
    """An API key account's 403 (`seen`) for the request's model: a permission its organization lacks (the model,
    a feature the request asks for), not a rejected credential (a 401). The account is held out of that model's
    requests for a while and serves the others; no retry soon helps."""

    named = "model_denied"

    def __init__(self, seen: ApiError, upstream_id: str, model: str) -> None:
        said = seen.message if len(seen.message) <= ERROR_MESSAGE_CAP else seen.message[:ERROR_MESSAGE_CAP] + "…"
        super().__init__(
            403,
            f"Upstream account {upstream_id} may not use model {model!r}: it answered 403 {seen.error_type} ({said});"
            " use another model (in Claude Code: /model or --model), or ask the operator to give the account access",
            "permission_error",
            [(b"x-poolgate-upstream", upstream_id.encode())],
        )
        self.seen = seen


UNSENDABLE_CREDENTIAL = "An upstream account's credential holds a control character, which no request can carry"


class CredentialUnsendable(CredentialRejected):
    """An account whose own credential no request can carry (a control character: stored before the checks on
    the way in, or so a token endpoint gave it): nothing was sent, and as for a rejected credential the
    operator has to act, and for a subscription account a refresh may bring a usable token."""

    named = "credential unsendable"

    def __init__(self, upstream_id: str) -> None:
        unsendable = ApiError(500, UNSENDABLE_CREDENTIAL, "api_error")
        super().__init__(unsendable, upstream_id, unsendable)

    def problem(self) -> str:
        return "has a credential with a control character in it, which no request can carry: give it a new one"


class GrantDead(CredentialRejected):
    """A subscription account whose refresh token was refused: answered as routing answers the requests after
    it, which is the pool's answer already."""

    named = "needs_reauth"


def unsendable_credential(signed: SignedRequest) -> bool:
    """Whether the account's credential holds a character no header may (the caller's own headers come through
    the server, which refuses those)."""
    return FORBIDDEN_IN_HEADER.search(signed.credential()) is not None


class TokenUnavailable(ApiError):
    """A subscription account rejected its access token (`seen`) and the token endpoint fails for now (the
    refresh goes on retrying in the background): not the operator's to fix, so answered as no usable
    account (529 with retry-after) rather than as a rejected credential."""

    def __init__(self, seen: ApiError, answer: ApiError) -> None:
        super().__init__(answer.status, answer.message, answer.error_type, answer.headers)
        self.seen = seen


# The 529s the gateway answers for an account that gave no answer of its own (none, or no usable token): their
# retry-after is the gateway's short wait already, not an account's to make the pool's.
GATEWAYS_OWN = (Unanswered, TokenUnavailable)
