"""When disconnect watching starts: one timer for all requests in flight, on whichever loop serves them."""

from __future__ import annotations

import asyncio

from poolgate.api.delivery import WATCH_AFTER, WATCH_TICK, WatchSchedule


class Watcher:
    def __init__(self) -> None:
        self.started = 0
        # The loop's clock when it was added and when its watch started.
        self.added_at = asyncio.get_running_loop().time()
        self.started_at: float | None = None

    def start(self) -> None:
        self.started += 1
        self.started_at = asyncio.get_running_loop().time()


async def added_and_waited(schedule: WatchSchedule, seconds: float) -> Watcher:
    watcher = Watcher()
    schedule.add(watcher, asyncio.get_running_loop())  # type: ignore[arg-type]
    await asyncio.sleep(seconds)
    return watcher


def test_a_request_is_watched_once_it_has_run_watch_after_seconds_and_not_before() -> None:
    schedule = WatchSchedule()

    async def scenario() -> Watcher:
        return await added_and_waited(schedule, WATCH_AFTER + 2 * WATCH_TICK)

    watcher = asyncio.run(scenario())
    # "Not before" by the loop's clock, which the schedule reads. Looked at after half the wait, a busy machine
    # could fail it: a loop that woke late ran the half-wait's timer and the schedule's tick in one turn.
    assert watcher.started == 1 and watcher.started_at is not None
    assert watcher.started_at - watcher.added_at >= WATCH_AFTER


def test_a_request_that_ends_before_its_watch_is_never_watched() -> None:
    schedule = WatchSchedule()

    async def scenario() -> int:
        watcher = Watcher()
        schedule.add(watcher, asyncio.get_running_loop())  # type: ignore[arg-type]
        schedule.discard(watcher)  # type: ignore[arg-type]
        await asyncio.sleep(WATCH_AFTER + 2 * WATCH_TICK)
        return watcher.started

    assert asyncio.run(scenario()) == 0


def test_watching_works_on_a_new_event_loop_after_the_old_one_closed_with_its_timer_armed() -> None:
    schedule = WatchSchedule()
    asyncio.run(added_and_waited(schedule, 0))  # the loop ends with a request waiting and the timer armed
    watcher = asyncio.run(added_and_waited(schedule, WATCH_AFTER + 2 * WATCH_TICK))
    assert watcher.started == 1
