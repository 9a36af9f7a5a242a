"""The policy and pricing stages' instructions per request, counted by callgrind in one process.

    python bench/stage_instructions.py            # ~2 min
    python bench/stage_instructions.py --write    # and (re)place its section of RESULTS.md

`policy_overhead.py` times the stages in the gateway, side by side with them off: the verdict, but its ratio moves
by a point between runs on this machine, more than most single changes to the stages are worth. This counts them:
the gateway's own `_admit`, `_price` and `Policy.settle` (`policy_overhead.Stages`) on requests decoded as the
gateway decodes them (the ~5 KB body of the wrk benchmarks), run in a process under `valgrind --tool=callgrind`,
minus the same process preparing the requests and running nothing. Runs agree to within ~2 % (objects hashed by
their address, a set of the budget's tickets among them, probe differently from run to run): a change's effect on
the stages, and where their instructions go (the functions of the compiled modules, each with what it calls),
without the noise of time. Instructions are not time (in the gateway the stages run with
cold caches, between the rest of the request's work); `policy_overhead.py` stays the verdict.

Arms: `pricing` (a key without claims: every answer priced), `on` (`policy_overhead.CLAIMS`: model globs, two
quotas, a monthly budget) and `on`'s claims one kind at a time; each net of `billable()`, which the gateway runs
for every answer, stages or not.
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
SECTION = "## Policy stages, instructions per request"
REQUESTS = 4000
_COLLECTED = re.compile(r"^==\d+== Collected : (\d+)$", re.MULTILINE)
# callgrind_annotate's inclusive line: "  1,234,567 (12.3%)  file:function [object]".
_INCLUSIVE = re.compile(r"^\s*([\d,]+)\s+\([^)]*\)\s+\S*?:(CPyDef_\w+)", re.MULTILINE)


def arms() -> dict[str, str | None]:
    """The arms' claims (YAML), by name; None: no claims (pricing only)."""
    import policy_overhead

    return {
        "pricing": None,
        **{name: claims for name, (_, claims) in policy_overhead.ONE_CLAIM.items()},
        "on": policy_overhead.CLAIMS,
    }


def child(arm: str, count: int, run: bool) -> None:
    """In the process callgrind counts: `count` requests of `arm` prepared, then run through the stages if `run`
    (else only `billable()` for each, which the gateway runs for every answer anyway)."""
    import policy_overhead
    from load import request_body
    from poolgate.lifecycle.accounting import billable

    stages = policy_overhead.Stages.make()
    contexts = stages.requests(stages.principal(arms()[arm]), request_body(False), count)
    # What was made so far out of the collector's way, as the gateway does after its start (`app.py`).
    gc.collect()
    gc.freeze()
    if run:
        stages.run(contexts)
    else:
        for _ in contexts:
            billable(stages.usage)


def counted(arm: str, run: bool, out: Path) -> int:
    """The instructions of one child process."""
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, __file__, "--child"]
    cmd += [arm, str(REQUESTS), "run" if run else "prepare"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=BENCH)
    found = _COLLECTED.search(done.stderr)
    if done.returncode != 0 or found is None:
        raise SystemExit(f"{arm}: callgrind failed: {done.stderr[-2000:]}")
    return int(found.group(1))


def functions(out: Path, baseline: Path) -> dict[str, float]:
    """The compiled functions' inclusive instructions per request (what they call included), run minus prepare."""

    def inclusive(path: Path) -> dict[str, int]:
        # Run where the build's relative source paths do not resolve: from the repository, a function's lines
        # were listed under both its absolute and its relative file name, and counted twice.
        text = subprocess.run(
            ["callgrind_annotate", "--auto=no", "--inclusive=yes", "--threshold=100", path.name],
            capture_output=True,
            text=True,
            check=True,
            cwd=path.parent,
        ).stdout
        found: dict[str, int] = {}
        for count, name in _INCLUSIVE.findall(text):
            found[name] = found.get(name, 0) + int(count.replace(",", ""))
        return found

    ran, prepared = inclusive(out), inclusive(baseline)
    return {name: (count - prepared.get(name, 0)) / REQUESTS for name, count in ran.items()}


def main() -> int:
    from procs import load_side
    from results import code_version, command_line, publish

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="(re)place its section of RESULTS.md")
    args = parser.parse_args()
    work = load_side("stage-instructions", "valgrind")
    per_request: dict[str, float] = {}
    breakdown: dict[str, float] = {}
    for arm in arms():
        baseline, out = work / f"{arm.replace(' ', '-')}.prepare.out", work / f"{arm.replace(' ', '-')}.run.out"
        prepared, ran = counted(arm, False, baseline), counted(arm, True, out)
        per_request[arm] = (ran - prepared) / REQUESTS
        print(f"{arm:12} {per_request[arm] / 1e3:8.1f} k instructions a request", flush=True)
        if arm == "on":
            breakdown = functions(out, baseline)
    lines = [
        SECTION,
        "",
        f"`{command_line('stage_instructions.py')}` — {code_version()}; {REQUESTS:,} requests per arm in one process "
        "under callgrind, less "
        "the same process preparing them and running nothing (see the script's docstring); k = thousand "
        "instructions a request. Runs agree to within ~2 %: for telling what a change to the stages does, and where "
        "their work is; the time in the gateway is `Policy overhead`'s.",
        "",
        "| arm | stages | over pricing alone |",
        "|---|---:|---:|",
    ]
    for arm, count in per_request.items():
        extra = count - per_request["pricing"]
        lines.append(f"| {arm} | {count / 1e3:.1f} k | {'–' if arm == 'pricing' else f'{extra / 1e3:+.1f} k'} |")
    top = sorted(((count, name) for name, count in breakdown.items() if count >= 500), reverse=True)[:16]
    lines += [
        "",
        "Where `on`'s go: the compiled modules' functions, each with what it calls (so a caller's figure holds its "
        "callees'), k a request:",
        "",
        "| function | k |",
        "|---|---:|",
        *(f"| `{name.removeprefix('CPyDef_').replace('___', '.')}` | {count / 1e3:.1f} |" for count, name in top),
    ]
    publish(SECTION, "\n".join(lines) + "\n", work, args.write)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(BENCH))
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], int(sys.argv[3]), sys.argv[4] == "run")
    else:
        raise SystemExit(main())
