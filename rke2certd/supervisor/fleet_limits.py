"""PURE: how many connections and agent long polls a server's endpoint holds, from the fleet.

Every agent holds one long poll on the server it talks to (supervisor/choice.py spreads them
evenly), and keeps up to KEPT_PER_AGENT more connections open for its short requests (a lease
refresh, its main loop's reads; connections.py). With the servers' one watch (watch_hub.py) a
long poll costs its server a thread and a socket, no datastore work, and a kept connection at
rest a thread and a socket, so the limit is what the fleet needs, within what the host can give:

- need: the agents of one server when another one is down (the fleet over servers - 1: a dead
  server's agents spread over the others), plus a quarter for the uneven spread and moves; each
  with its long poll and its kept connections (at a full endpoint, kept connections at rest
  are closed first: limits.py, so a tight limit costs handshakes, never an agent's place);
- capacity: a quarter of the open-file limit (the rest for the datastore, the CA files, the
  daemon's own), never more than MAX (each connection is a thread);
- never below the defaults (a small fleet keeps the limits it always had).

Long polls may take three quarters of the connections (more than the agents need when the
limit is what they need; all the room there is when the host caps it).

Spread. Each agent's preferred server is a hash of its name (choice.py), even only on average
(a hundred agents over three servers: about 33 +- 5 each; sim-0000..sim-0099 land 22/36/42).
So a server takes as its own
at most `home` agents, a twentieth over its fair share (never fewer than MIN_HOME: a small fleet
goes by the hash alone), those that prefer it first; it serves the others too, and tells them
it is crowded, so that they use their next server (cluster_api.py). With every server up,
no server then holds more than a twentieth over its share, so none less than a tenth under it
(with three).

Beyond the limits the server pushes back, and agents retry, never fail: a long poll beyond its
limit is answered at once with a time to ask again; a connection beyond its limit is closed,
and the agent tries its next server, then again after a pause.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from rke2certd.supervisor import MAX_CONNECTIONS

MAX = 4096  # connections (threads) one endpoint ever holds
MIN_HOME = 16  # agents a server always takes as its own (the hash alone spreads a small fleet)
KEPT_PER_AGENT = 2  # connections an agent keeps besides its long poll (lease, main loop)


@dataclass(frozen=True)
class Limits:
    connections: int
    watches: int
    reason: str
    home: int = MIN_HOME  # agents this server takes as its own before it says it is crowded


def fleet_limits(agents: int, servers: int, open_files: int) -> Limits:
    """The limits for `agents` agent-only nodes over `servers` servers, on a host where a
    process may open `open_files` files."""
    share = math.ceil(max(0, agents) / max(1, servers - 1))
    agents_here = math.ceil(share * 5 / 4)
    need = agents_here * (1 + KEPT_PER_AGENT) + 1
    capacity = max(MAX_CONNECTIONS, min(MAX, open_files // 4))
    connections = max(MAX_CONNECTIONS, min(need, capacity))
    reason = (
        f"{agents} agent(s) over {servers} server(s): up to {share} here with one server down; "
        f"the host allows {capacity} connections"
    )
    home = max(MIN_HOME, agents * 21 // (20 * max(1, servers)))
    return Limits(connections, connections * 3 // 4, reason, home)
