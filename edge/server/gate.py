"""Admission before media decoding: an HTTP request takes its place in line before it decodes anything.

Why a gate in front of `Engine.admission`: the engine admits a request when its job starts, which is after the
HTTP layer has decoded the request's images, audio and video; so with a full queue every request still decoded
its media before it got its 429, and any number of requests decoded at once. The gate has the same size as the
engine's admission (`concurrency` running, `max_queue` waiting, FIFO, 429 + Retry-After beyond), and a request
holds its ticket from before decoding until its response is done; the engine's own admission then only ever
sees requests that hold a ticket (plus live socket turns), so the two never disagree on who waits.
"""

from __future__ import annotations

import weakref

from edge.server.engine import Admission
from edge.server.errors import QueueFullError


class Ticket:
    """A place held in the gate; `release` is idempotent (called by whichever of the owners finishes last)."""

    def __init__(self, gate: Admission):
        self._gate = gate
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._gate.release()

    def bind(self, owner) -> None:
        """Release when `owner` (e.g. a response body iterator that may never be started) is garbage."""
        weakref.finalize(owner, self.release)


class RequestGate:
    def __init__(self, slots: int, max_queue: int):
        self.admission = Admission(slots, max_queue)
        self.rejected = 0

    @property
    def running(self) -> int:
        return self.admission.running

    @property
    def queued(self) -> int:
        return self.admission.queued

    async def enter(self) -> Ticket:
        """Wait for a place (FIFO); QueueFullError (429) when the queue is full. Cancelling the wait frees it."""
        try:
            await self.admission.acquire()
        except QueueFullError:
            self.rejected += 1
            raise
        return Ticket(self.admission)
