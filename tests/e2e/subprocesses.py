"""Running the Node programs the end-to-end tests drive (Claude Code, the TypeScript SDK's script)."""

from __future__ import annotations

import asyncio


async def communicate_within(process: asyncio.subprocess.Process, seconds: float) -> tuple[bytes, bytes]:
    """The process's stdout and stderr once it ends; killed (and reaped) when it takes longer than `seconds`."""
    try:
        return await asyncio.wait_for(process.communicate(), seconds)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
