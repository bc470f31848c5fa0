"""Which agents a server counts as its own: at most `home` of them (fleet_limits.py), those that
rank it highest (choice.py), seen lately.

A server that has its share tells the other agents it is crowded, so that they use their next
server; it serves them all the same. An agent that ranks the server higher than one of its own
does takes that one's place (the one that ranks it lowest, seen least lately), and that one is
told at its next request. So the agents that prefer a server are never kept out by others that
merely failed over to it (while it was busy, say).

A place is given up three ways: the agent says it left (it moved back to its preferred server,
remote.py), it was not seen for SEEN_SECONDS (it died, or moved while this server was not
answering), or an agent that ranks the server higher takes it. Without the first, every agent
that failed over during a busy moment and went home kept a place here for SEEN_SECONDS, and the
agents that really had to move here were told it was crowded meanwhile: with every server
crowded for them, they stayed where they were, past their server's share.

Time is passed in (monotonic seconds); thread-safe (the endpoint's request threads share it).
"""

from __future__ import annotations

import threading

from rke2certd.supervisor import wire
from rke2certd.supervisor.fleet_limits import MIN_HOME

# An agent counts as one of this server's while it asked something within this (its long poll
# asks at least every MAX_WATCH_SECONDS, its lease refresh every ttl/3).
SEEN_SECONDS = 2 * wire.MAX_WATCH_SECONDS + 10


class Home:
    def __init__(self, size: int = MIN_HOME) -> None:
        self.size = size
        self._own: dict[str, tuple[float, int]] = {}  # node -> (last seen, its rank here)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._own)

    def crowded(self, node: str, now: float, rank: int = 0) -> bool:
        """Whether to tell `node` to use its next server: this one has its share of agents
        (seen lately), `node` is not one of them, and none of them ranks this server lower
        than `node` does (`rank`: 0 for its preferred server). Otherwise `node` is (still)
        one of them, in the place of the one that ranks it lowest if it had to be."""
        with self._lock:
            own = self._own
            if node not in own and len(own) >= self.size:
                for gone in [n for n, (seen, _) in own.items() if now - seen > SEEN_SECONDS]:
                    del own[gone]
                if len(own) >= self.size:
                    last = max(own, key=lambda n: (own[n][1], -own[n][0]))
                    if own[last][1] <= rank:
                        return True
                    del own[last]  # told it is crowded at its next request
            own[node] = (now, rank)
            return False

    def holds(self, node: str) -> bool:
        """Whether `node` is one of this server's own now."""
        with self._lock:
            return node in self._own

    def left(self, node: str) -> bool:
        """`node` moved to another server: its place is free now. Whether it had one."""
        with self._lock:
            return self._own.pop(node, None) is not None
