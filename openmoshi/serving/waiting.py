"""The server's waiting line: clients that arrive while every conversation slot is taken wait here,
first come first served, instead of being refused (the official server makes them wait on a lock).

Everything runs on the event loop. A waiter holds a `Ticket`; `admit()` is called whenever a slot
may have freed and hands slots to the front of the line for as long as `open_slot` finds one, so a
client never overtakes an earlier one. Whoever leaves the line, admitted or gone, wakes the others,
which then tell their clients their new place (`wait_turn`).
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

# How a wait ends (`wait_turn`).
ADMITTED = "admitted"
LEFT = "left"  # the client went away, or could not be told its place
TIMED_OUT = "timed_out"
STOPPING = "stopping"


@dataclass(eq=False)
class Ticket:
    """One waiter. `open_slot()` reserves a slot for it (None when all are taken); once admitted,
    `slot` holds what it returned. `wake` is set when the waiter is admitted or moves up."""

    open_slot: Callable[[], Any]
    slot: Any = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)


class WaitingLine:
    """A bounded FIFO of tickets; `on_change(n)` is told the number waiting after every change."""

    def __init__(self, size: int, on_change: Callable[[int], None] | None = None):
        if size < 0:
            raise ValueError(f"the waiting line size must be >= 0, got {size}")
        self.size = size
        self.on_change = on_change
        self._tickets: deque[Ticket] = deque()

    def __len__(self) -> int:
        return len(self._tickets)

    def join(self, open_slot: Callable[[], Any]) -> Ticket | None:
        """A new ticket at the back of the line; None when the line is full."""
        if len(self._tickets) >= self.size:
            return None
        ticket = Ticket(open_slot)
        self._tickets.append(ticket)
        self._changed()
        return ticket

    def position(self, ticket: Ticket) -> int:
        """1 for the next to be admitted; 0 for a ticket no longer in line."""
        try:
            return self._tickets.index(ticket) + 1
        except ValueError:
            return 0

    def leave(self, ticket: Ticket) -> None:
        """Takes a ticket out of the line (a waiter that gave up); nothing if it is not in it."""
        try:
            self._tickets.remove(ticket)
        except ValueError:
            return
        self._changed()

    def admit(self) -> int:
        """Gives free slots to the front of the line, in order; returns how many were admitted."""
        admitted = 0
        while self._tickets:
            slot = self._tickets[0].open_slot()
            if slot is None:
                break
            ticket = self._tickets.popleft()
            ticket.slot = slot
            ticket.wake.set()
            admitted += 1
        if admitted:
            self._changed()
        return admitted

    def wake_all(self) -> None:
        for ticket in self._tickets:
            ticket.wake.set()

    def _changed(self) -> None:
        self.wake_all()  # positions or the length moved: every waiter tells its client
        if self.on_change is not None:
            self.on_change(len(self._tickets))


async def wait_turn(line: WaitingLine, ticket: Ticket, tell: Callable[[int, int], Awaitable[None]],
                    gone: asyncio.Task, timeout: float, every: float, stopping: Callable[[], bool]) -> str:
    """Waits until `ticket` is admitted, the `gone` task ends (the client left), `timeout` seconds
    pass or `stopping()` holds; returns which (ADMITTED, LEFT, TIMED_OUT, STOPPING). Meanwhile
    `tell(position, length)` runs at once, every `every` seconds and whenever the ticket moves up;
    if it raises a connection error or times out, the client counts as gone. Whatever the outcome,
    the ticket is out of the line on return; an ADMITTED ticket holds its slot in `ticket.slot`."""
    deadline = asyncio.get_running_loop().time() + timeout
    waker = None
    try:
        while True:
            ticket.wake.clear()  # set again by any move from here on, even while telling
            if ticket.slot is not None:
                return ADMITTED
            if gone.done():
                return LEFT
            if stopping():
                return STOPPING
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return TIMED_OUT
            try:
                await tell(line.position(ticket), len(line))
            except (asyncio.TimeoutError, ConnectionError, RuntimeError):
                return LEFT
            waker = asyncio.create_task(ticket.wake.wait())
            await asyncio.wait({gone, waker}, timeout=min(left, every), return_when=asyncio.FIRST_COMPLETED)
            waker.cancel()
    finally:
        if waker is not None:
            waker.cancel()
        line.leave(ticket)
