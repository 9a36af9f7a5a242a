"""An admitted request's hold on its principal's quotas and budget (see `lifecycle.policy`).

A msgspec Struct, kept out of the modules setup.py compiles: mypyc drops a Struct's class options
(`gc=False`) and its field types.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

if TYPE_CHECKING:
    from poolgate.lifecycle.budgets import BudgetTicket
    from poolgate.lifecycle.context import Principal
    from poolgate.lifecycle.quotas import PrincipalQuotas


class Admission(msgspec.Struct, gc=False):
    """An admitted request's hold on its principal's quotas and budget, released by `Policy.settle`.

    `head_lines` (quota and budget state, `api.http.HEAD_LINES`) are meant for the response. (A Struct: one per
    request of a caller with quotas or a budget, made in C.)"""

    principal: Principal | None
    quotas: PrincipalQuotas | None = None
    budget: BudgetTicket | None = None
    head_lines: bytes = b""
    settled: bool = False


# The admission of every request with nothing to enforce: shared, never mutated (settle ignores it).
ADMITTED = Admission(None)
