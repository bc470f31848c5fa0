"""How many connections the endpoint holds, from whom, and for how long before they prove
themselves: the defence against clients that connect and then send nothing, or trickle.

Every connection starts *pending*: it must finish its TLS handshake, request line, headers and
body within `deadline` seconds of being accepted, in total (a per-operation timeout would let a
client that sends a byte every few seconds stay for ever). At the deadline its socket is shut
down from a reaper thread, which wakes the worker blocked in recv. A request that shows a valid
credential is *promoted*: it no longer counts as pending and has no deadline (a long poll may
legitimately wait 25 s for an answer).

At most `max_pending` connections are pending at once; a new one beyond that cuts the oldest
pending one (an honest client's handshake takes milliseconds, so the oldest is the slowest). At
most `per_address` are pending from one source address; more from it are refused at once. The
total stays at `max_total` (the pending ones are cut first), so authenticated connections always
keep `max_total - max_pending` places that unauthenticated clients cannot take.

An authenticated connection is kept open between its requests (http.py): while it waits for
the next one it *rests*. A full gate cuts the connection that has rested longest before any
other (its client makes a new one when it needs it: a handshake, nothing lost), and such a cut
is ordinary, not logged as a warning. Stopping the gate cuts every resting connection.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(eq=False)
class Ticket:
    """One accepted connection, as the gate tracks it."""

    address: str
    sock: socket.socket | None  # the object that owns the fd now (plain, then TLS)
    deadline: float
    pending: bool = True
    cut: bool = False
    why: str = ""  # why it was cut, for the log
    seq: int = field(default=0)
    quiet: bool = False  # cut while resting: ordinary, no warning


@dataclass(frozen=True)
class Refusal:
    reason: str


class ConnectionGate:
    def __init__(
        self,
        *,
        max_total: int,
        max_pending: int,
        per_address: int,
        deadline: float,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_total, self.max_pending = max_total, max_pending
        self.per_address, self.deadline = per_address, deadline
        self._now = monotonic
        self._cond = threading.Condition()
        self._live = 0  # tickets not cut and not released
        self._pending: OrderedDict[Ticket, None] = OrderedDict()  # oldest first
        self._resting: OrderedDict[Ticket, None] = OrderedDict()  # longest at rest first
        self._by_address: dict[str, int] = {}
        self._heap: list[tuple[float, int, Ticket]] = []
        self._seq = itertools.count()
        self._stopping = False
        self.accepted = 0  # connections admitted since start (tests: how many were made)
        self._thread = threading.Thread(target=self._reap, name="rke2certd-reaper", daemon=True)
        self._thread.start()

    # the accept thread

    def admit(self, address: str, sock: socket.socket) -> Ticket | Refusal:
        with self._cond:
            if self._by_address.get(address, 0) >= self.per_address:
                return Refusal(
                    f"{self.per_address} connections from this address are still unauthenticated"
                )
            while self._resting and self._live >= self.max_total:
                self._cut(next(iter(self._resting)), "closed at rest to make room", quiet=True)
            while self._pending and (
                len(self._pending) >= self.max_pending or self._live >= self.max_total
            ):
                oldest = next(iter(self._pending))
                self._cut(oldest, "cut to make room: the oldest unauthenticated connection")
            if self._live >= self.max_total:
                return Refusal(f"{self.max_total} authenticated connections are open")
            ticket = Ticket(address, sock, self._now() + self.deadline, seq=next(self._seq))
            self.accepted += 1
            self._pending[ticket] = None
            self._by_address[address] = self._by_address.get(address, 0) + 1
            self._live += 1
            heapq.heappush(self._heap, (ticket.deadline, ticket.seq, ticket))
            self._cond.notify()
            return ticket

    # the connection's own thread

    def rebind(self, ticket: Ticket, sock: socket.socket) -> bool:
        """The TLS socket now owns the fd; False: the ticket was cut meanwhile."""
        with self._cond:
            ticket.sock = sock
            if ticket.cut:
                self._shutdown(sock)
            return not ticket.cut

    def promote(self, ticket: Ticket) -> None:
        """The connection showed a valid credential: no deadline, no longer pending."""
        with self._cond:
            if ticket.pending and not ticket.cut:
                self._leave_pending(ticket)

    def rest(self, ticket: Ticket) -> bool:
        """The connection waits for its next request; False: it is to close (cut, stopping)."""
        with self._cond:
            if ticket.cut or self._stopping:
                return False
            self._resting[ticket] = None
            return True

    def wake(self, ticket: Ticket) -> bool:
        """The connection's next request came; False: it was cut meanwhile."""
        with self._cond:
            self._resting.pop(ticket, None)
            return not ticket.cut

    def release(self, ticket: Ticket) -> None:
        """The connection is done. Called before its socket is closed, so that the reaper never
        shuts down an fd number that a later connection reuses."""
        with self._cond:
            if ticket.pending:
                self._leave_pending(ticket)
            self._resting.pop(ticket, None)
            if not ticket.cut:
                self._live -= 1
                ticket.cut = True
            ticket.sock = None

    def resize(self, max_total: int) -> None:
        """A new total (the fleet grew or shrank): connections over it stay; new ones cut the
        oldest pending to make room, as at any full gate."""
        with self._cond:
            self.max_total = max_total

    def counts(self) -> tuple[int, int]:
        """(live, pending) connections (tests and metrics)."""
        with self._cond:
            return self._live, len(self._pending)

    def resting(self) -> int:
        """Connections at rest between two requests (tests)."""
        with self._cond:
            return len(self._resting)

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            for ticket in list(self._resting):
                self._cut(ticket, "the endpoint stops", quiet=True)
            self._cond.notify()
        self._thread.join(timeout=5)

    # internals (under the lock)

    def _leave_pending(self, ticket: Ticket) -> None:
        ticket.pending = False
        self._pending.pop(ticket, None)
        left = self._by_address.get(ticket.address, 1) - 1
        if left > 0:
            self._by_address[ticket.address] = left
        else:
            self._by_address.pop(ticket.address, None)

    def _cut(self, ticket: Ticket, why: str, *, quiet: bool = False) -> None:
        if ticket.cut:
            return
        if ticket.pending:
            self._leave_pending(ticket)
        self._resting.pop(ticket, None)
        ticket.cut, ticket.why, ticket.quiet = True, why, quiet
        self._live -= 1
        if ticket.sock is not None:
            self._shutdown(ticket.sock)

    @staticmethod
    def _shutdown(sock: socket.socket) -> None:
        # The plain socket's shutdown, also for a TLS socket: SSLSocket.shutdown would drop its
        # TLS state under the worker thread that is reading from it.
        with contextlib.suppress(OSError):
            socket.socket.shutdown(sock, socket.SHUT_RDWR)

    def _reap(self) -> None:
        with self._cond:
            while not self._stopping:
                now = self._now()
                while self._heap and (self._heap[0][0] <= now or not self._heap[0][2].pending):
                    _, _, ticket = heapq.heappop(self._heap)
                    if ticket.pending and not ticket.cut:
                        self._cut(ticket, f"no complete request within {self.deadline:g} s")
                wait = self._heap[0][0] - now if self._heap else None
                self._cond.wait(wait)
