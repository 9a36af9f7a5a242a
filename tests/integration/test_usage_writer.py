"""The usage writer process: what is handed to it gets written, whatever signals the process group gets."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from poolgate.store.db import migrate, open_engine
from poolgate.store.usage import UsageWriter, count_records
from tests.unit.test_observe import event


async def test_a_group_signal_while_the_writer_is_still_starting_loses_nothing(tmp_path: Path) -> None:
    """Ctrl-C or systemd signal the whole process group, possibly within the second the spawned writer
    needs to import: it must ignore SIGINT and SIGTERM from birth, not only once its code runs."""
    engine = open_engine(f"sqlite:///{tmp_path / 'usage.db'}")
    migrate(engine)
    writer = UsageWriter(engine, tmp_path / "dead-letter.jsonl", flush_interval=0.01)
    writer.start()
    assert writer._process is not None and writer._process.pid is not None
    os.kill(writer._process.pid, signal.SIGTERM)
    os.kill(writer._process.pid, signal.SIGINT)
    for index in range(50):
        writer.submit(event(f"req_{index}").record)
    await writer.stop()
    assert count_records(engine) == 50
    assert not (tmp_path / "dead-letter.jsonl").exists()
