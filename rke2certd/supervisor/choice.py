"""Which server an agent talks to: spread over the servers, sticky, and back home when it can.

Each agent ranks the `server` URLs by rendezvous hashing: by SHA-256 of (its node name, the
URL), highest first. The first URL is its preferred server; the rank is its fail-over order.
Every agent has its own rank, so the fleet spreads evenly over the servers, and when a server
fails its agents spread over the others instead of all falling onto the next one in the list.
Adding or removing a server moves only the agents that preferred it.

`ServerChoice` keeps an agent on the server that answered last (a dead preferred server costs
one failed attempt, not one per request), and tries its preferred server first again once
every `prefer_again` seconds (the `preferred-server-retry` setting), so that the agents move
back when it returns. Nothing an agent
holds lives in one server's memory (registration, leases, watch revisions are the datastore's),
so a move costs the agent nothing but the request that failed.

A server that has its share of the fleet says so to the agents beyond it (`crowded`,
fleet_limits.py), keeping those that rank it highest (each request says where the server is in
the agent's rank): the agent avoids it for `prefer_again` seconds and uses the next one in its
rank that is not avoided (if every one is, it stays where it is: crowded servers still serve).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence

# How often an agent away from its preferred server tries that one first again, by default
# (the `preferred-server-retry` setting).
PREFER_AGAIN = 30.0


def preferred_order(urls: Sequence[str], node: str) -> list[str]:
    """`urls` ranked for `node` (rendezvous hashing); duplicates dropped, ties by URL."""

    def weight(url: str) -> bytes:
        return hashlib.sha256(f"{node}\0{url}".encode()).digest()

    unique = list(dict.fromkeys(urls))
    return sorted(unique, key=lambda u: (weight(u), u), reverse=True)


class ServerChoice:
    """The order to try the servers in, now: the one that answered last first, the others in
    rank order; the preferred one first when a try at it is due. Thread-safe (the link's
    threads and the main loop share it). Time is passed in (monotonic seconds)."""

    def __init__(self, ranked: Sequence[str], prefer_again: float = PREFER_AGAIN) -> None:
        self.ranked = list(ranked)
        self.prefer_again = prefer_again
        self.current = self.ranked[0] if self.ranked else ""
        self._tried_home = 0.0  # when the preferred server was last tried
        self._avoid: dict[str, float] = {}  # crowded servers -> until when they are avoided
        self.moves = 0  # how many times it moved: an answer to a request sent before is late
        self._lock = threading.Lock()

    @property
    def preferred(self) -> str:
        return self.ranked[0]

    def rank(self, url: str) -> int:
        """Where `url` is in this agent's rank (0: its preferred server)."""
        return self.ranked.index(url) if url in self.ranked else len(self.ranked)

    def order(self, now: float) -> list[str]:
        with self._lock:
            free = [u for u in self.ranked if not self._avoided(u, now)]
            first = self.current
            if first not in free and free:
                first = free[0]  # crowded: the next server in rank that is not
            home = self.preferred
            due = now - self._tried_home >= self.prefer_again
            if home in free and (first == home or due):
                self._tried_home = now  # tried (again) now: the next try after prefer_again
                first = home
            # then the others in rank, the crowded ones last: an agent told that its server
            # is crowded tries every other one before it (its next may not answer)
            rest = [u for u in self.ranked if u != first]
            return [first] + [u for u in rest if u in free] + [u for u in rest if u not in free]

    def crowded(self, url: str, now: float, moves: int | None = None) -> None:
        """`url` answered a request sent after `moves` moves that it has its share of agents:
        avoid it for a while. Not if the agent moved since: the server said so as the request
        arrived, and a long poll's answer comes up to 25 s later, when the server may have
        taken the agent as its own (it went home meanwhile). Heeded, the stale word sent the
        agent away from its preferred server and back at the next try, every other try."""
        with self._lock:
            if moves is None or moves == self.moves:
                self._avoid[url] = now + self.prefer_again

    def avoids(self, url: str, now: float) -> bool:
        """Whether `url` said lately that it is crowded (tried last until `prefer_again`)."""
        with self._lock:
            return self._avoided(url, now)

    def _avoided(self, url: str, now: float) -> bool:  # (under the lock)
        return self._avoid.get(url, 0.0) > now

    def answered(self, url: str, moves: int | None = None) -> str | None:
        """`url` answered a request sent after `moves` moves; the server moved to, if this is a
        move (None: no change). An answer to a request sent before the agent last moved does
        not move it back: a long poll sent to the server it was on ends up to 25 s later, and
        would undo every move home made meanwhile (then the next poll goes there again)."""
        with self._lock:
            if url == self.current or (moves is not None and moves != self.moves):
                return None
            self.current = url
            self.moves += 1
            return url
