"""The live views' pacing (metrics.live.ChangeListener): the first change after a quiet spell is acted on
at once, a burst costs one more tick at the end of the interval, and ticks stay an interval apart."""

from __future__ import annotations

import asyncio

from metrics.live import ChangeListener
from realtime import Hub, MemoryBroker, RealtimeStats

INTERVAL = 2.0


class Recorder(ChangeListener):
    def __init__(self, hub: Hub) -> None:
        super().__init__(hub, "__test_changes__", INTERVAL, "recorder")
        self.dirty = False
        self.ticks: list[float] = []

    def note(self, raw: bytes) -> None:
        self.dirty = True
        self.wake()

    async def tick(self) -> bool:
        if not self.dirty:
            return False
        self.dirty = False
        self.ticks.append(asyncio.get_running_loop().time())
        return True


async def test_leading_edge_then_one_trailing_tick_per_interval():
    hub = Hub(MemoryBroker(), RealtimeStats())
    await hub.start()
    recorder = Recorder(hub)
    await recorder.start()
    loop = asyncio.get_running_loop()
    try:
        await asyncio.sleep(
            INTERVAL * 1.2
        )  # past an idle tick: ticks that push nothing do not delay the next
        noticed = loop.time()
        await hub.publish_raw("__test_changes__", b"1")
        while not recorder.ticks and loop.time() - noticed < INTERVAL:
            await asyncio.sleep(0.01)
        # Acted on well before a fixed once-per-interval timer would have fired.
        assert recorder.ticks and recorder.ticks[0] - noticed < INTERVAL / 2
        for _ in range(5):  # a burst right after: held back to the end of the interval, then one tick
            await hub.publish_raw("__test_changes__", b"1")
        await asyncio.sleep(INTERVAL * 1.6)
        assert len(recorder.ticks) == 2
        assert recorder.ticks[1] - recorder.ticks[0] >= INTERVAL
    finally:
        await recorder.stop()
        await hub.stop()
