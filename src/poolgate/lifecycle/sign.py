"""sign: `ShapedRequest` → `SignedRequest`. The only place that holds or applies upstream credentials."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from poolgate.lifecycle.shape import ShapedRequest

_SEAL = object()


@dataclass(frozen=True, slots=True)
class SignedRequest:
    """A request ready to send. Only `Signer.sign` can make one (the sealed-capability rule)."""

    shaped: ShapedRequest
    headers: tuple[tuple[str, str], ...]
    seal: object

    def __post_init__(self) -> None:
        if self.seal is not _SEAL:
            raise TypeError("a SignedRequest can only be made by the Signer")

    def __repr__(self) -> str:  # never print the credential
        return f"SignedRequest(upstream={self.shaped.upstream.id!r}, url={self.shaped.url!r})"


class MissingCredential(Exception):
    pass


class Signer:
    def __init__(self) -> None:
        self._api_keys: dict[str, str] = {}

    def load(self, api_keys: Mapping[str, str]) -> None:
        self._api_keys = dict(api_keys)

    def sign(self, shaped: ShapedRequest) -> SignedRequest:
        key = self._api_keys.get(shaped.upstream.id)
        if key is None:
            raise MissingCredential(shaped.upstream.id)
        return SignedRequest(shaped, (*shaped.headers, ("x-api-key", key)), _SEAL)
