"""`poolgate route`: why requests went where they went, from the routing traces in the usage records
(`route explain REQUEST_ID`, `route last`): each stage's kept and dropped accounts, the scores, the strategy
and the failover order (`print_route`)."""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

import typer

from poolgate.cli.options import ConfigOption, DataDirOption
from poolgate.cli.output import console, err, fail, folding_table, local_time, shown
from poolgate.cli.store import load, records_engine
from poolgate.lifecycle.routing.scoring import TERMS
from poolgate.store.usage import find_route, last_routes
from poolgate.telemetry.logging import visible

route_app = typer.Typer(no_args_is_help=True, help="Explain routing decisions from the usage records.")


def print_route(record: dict[str, object], retention_days: float | None = None) -> None:
    # Upstream ids as written too: a stored one may predate the checks on ids (see `shown`).
    request, key, model, session, upstream = (
        shown(str(record[field] or "-"))
        for field in ("request_id", "principal_name", "model", "session_id", "upstream_id")
    )
    console.print(
        f"[bold]{request}[/bold]  {local_time(record['started_at'])}  key={key}  "  # type: ignore[arg-type]
        f"model={model}  session={session}  status={record['status']}  "
        f"upstream={upstream}  attempts={record['attempts']}",
        highlight=False,
    )
    route = json.loads(str(record["route"])) if record.get("route") else None
    if route is None:
        # Routed: served by an account, or refused by the router (`no_upstream`), which traced it all the same.
        routed = record.get("upstream_id") is not None or record.get("outcome") == "no_upstream"
        started = float(record["started_at"])  # type: ignore[arg-type]
        if routed and retention_days is not None and started < time.time() - retention_days * 86400:
            console.print(
                f"  its routing trace was dropped (older than store.trace_retention_days: {retention_days:g})"
            )
        else:
            console.print("  no routing trace (the request ended before routing)")
        return
    if not route["stages"]:
        console.print(f"  sent by the gateway itself ({record.get('endpoint')}) to its session's account: no routing")
    table = folding_table("stage", "kept", "dropped (reason)", "µs")
    for stage in route["stages"]:
        dropped = ", ".join(f"{shown(upstream)} ({shown(reason)})" for upstream, reason in stage["dropped"].items())
        kept = ", ".join(map(shown, stage["kept"])) or "-"
        if stage.get("kept_count"):
            kept += f" … ({stage['kept_count']} in all)"
        table.add_row(shown(stage["name"]), kept, dropped or "-", f"{stage['us']:.1f}")
    if route["stages"]:
        console.print(table)
    scores = _scores(route.get("scores"))
    if scores:
        sampled = " (a sample of the pool)" if route.get("sampled") else ""
        ranked = folding_table(f"scored{sampled}", "total", "terms (weighted; lower is better)", "prompt cache")
        for score in sorted(scores, key=lambda score: score.get("total", 0.0)):
            ranked.add_row(*_score_row(score))
        console.print(ranked)
    terminal = route["terminal"]
    if terminal:
        sticky = " (session's account first)" if terminal["sticky"] else ""
        console.print(
            f"  strategy {terminal['strategy']}: chose {shown(terminal['chosen'] or 'nothing')}{sticky}; "
            f"failover order {', '.join(map(shown, terminal['order'])) or '-'}",
            highlight=False,
        )
    for failed in route.get("failed") or ():
        console.print(
            f"  tried {visible(failed['upstream_id'])}: {failed['status']} {visible(str(failed['error_type']))} "
            f"({visible(failed['message'])})",
            highlight=False,
            markup=False,
        )


def _score_row(score: dict[str, Any]) -> tuple[str, str, str, str]:
    terms = [f"{name} {score[name]:.3f}" for name in TERMS if isinstance(score.get(name), int | float) and score[name]]
    cache = score.get("cache_prediction")
    predicted = (
        f"read {cache['read']:,} / write {cache['write']:,} ({cache['confidence']:.0%} sure)"
        if isinstance(cache, dict)
        else "-"
    )
    upstream = shown(str(score.get("upstream_id", "?")))
    return upstream, f"{score.get('total', 0.0):.3f}", ", ".join(terms) or "-", predicted


def _scores(scores: object) -> list[dict[str, Any]]:
    """A trace's scores as a list. Traces written before the list form held a mapping by upstream id, with
    the cache prediction under `cache` (where it hid the `cache` term)."""
    if isinstance(scores, dict):
        return [
            {"upstream_id": upstream_id, **score, "cache_prediction": score.get("cache")}
            for upstream_id, score in scores.items()
        ]
    return scores if isinstance(scores, list) else []


@route_app.command("explain")
def route_explain(
    request_id: Annotated[
        str, typer.Argument(metavar="REQUEST_ID", help="The request id (the `request-id` response header).")
    ],
    config_path: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Show why a request went where it went: each routing stage, what it kept and dropped, and why."""
    # A pasted id often brings a blank or a line end along; an id that is all blanks named nothing to look for
    # (`no usage record for  (…)`).
    request_id = request_id.strip()
    if not request_id:
        raise fail("REQUEST_ID is empty: give an answer's request-id header (req_…); `poolgate route last` lists them")
    config = load(config_path, data_dir)
    record = find_route(records_engine(config), request_id)
    if record is None:
        raise fail(f"no usage record for {request_id} (records are written within a second of the answer)")
    print_route(record, config.store.trace_retention_days)


@route_app.command("last")
def route_last(
    count: Annotated[int, typer.Option("-n", min=1, max=1000, help="How many recent requests.")] = 5,
    config_path: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Explain the routing of the most recent requests, the latest first (as `GET /admin/routes` lists them)."""
    config = load(config_path, data_dir)
    records = last_routes(records_engine(config), count)
    for record in records:
        print_route(record, config.store.trace_retention_days)
    if not records:
        # Silence and exit 0 read as a command that did nothing.
        err.print("no requests recorded in the store yet", highlight=False)
