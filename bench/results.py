"""RESULTS.md bookkeeping shared by the harnesses: which code ran, and one section replaced at a time."""

from __future__ import annotations

import shlex
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "RESULTS.md"


def command_line(script: str) -> str:
    """The command that ran, as RESULTS.md records it: runnable as written from the repository (with the
    README's virtualenv, whatever `python` is on the PATH), its arguments quoted as a shell needs them."""
    return shlex.join([".venv/bin/python", f"bench/{script}", *sys.argv[1:]])


def median_with_spread(values: list[float], show: Callable[[float], str]) -> str:
    """Per-round values as the harnesses report them: the median, and the middle half of the rounds in
    brackets once there are 4 or more of them."""
    middle = show(statistics.median(values))
    if len(values) < 4:
        return middle
    low, _, high = statistics.quantiles(values, n=4)
    return f"{middle} [{show(low)}, {show(high)}]"


def code_version() -> str:
    """Which poolgate ran: the repository's HEAD, and whether the code imported is the working tree with
    uncommitted changes in src/ (other people edit it while benchmarks run)."""
    import poolgate

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=BENCH.parent, capture_output=True, text=True, timeout=30)
        return done.stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    source = Path(poolgate.__file__).resolve().parent
    if source.is_relative_to(BENCH.parent / "src"):
        dirty = git("status", "--porcelain", "--", "src")
        return f"poolgate at `{head}`" + (" plus uncommitted changes in src/" if dirty else "")
    return f"poolgate from `{source}` (repository HEAD `{head}`)"


def write_section(heading: str, section: str) -> None:
    """Replace the section under `heading` in RESULTS.md, or append it; the rest of the file is left alone."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    start = text.find("\n" + heading + "\n")
    if start < 0:
        RESULTS.write_text(text.rstrip("\n") + "\n\n" + section)
        return
    end = text.find("\n## ", start + 1)
    rest = text[end:] if end >= 0 else ""
    RESULTS.write_text(text[: start + 1] + section + rest)


def publish(heading: str, section: str, work: Path, write: bool) -> None:
    """A harness's report: into its work directory and onto stdout, and into RESULTS.md under `heading`
    when asked."""
    (work / "report.md").write_text(section)
    print("\n" + section)
    print(f"logs and the report: {work}")
    if write:
        write_section(heading, section)
