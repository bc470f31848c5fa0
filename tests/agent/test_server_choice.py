"""Agents spread over the servers (supervisor/choice.py), stay on the one that answers, move
back to their preferred one when it returns, and keep what they hold across the move: two real
endpoints on one SQLite datastore, one of them stopped under an agent that holds a lease
granted there."""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from rke2certd.commands.agent import node_password, supervisor_urls
from rke2certd.commands.agent_rollout import trusted_bundle
from rke2certd.datastore.sqlite import SQLiteDatastore
from rke2certd.node.node import Node
from rke2certd.plan.rollout import Member, Phase, Registration, Slot
from rke2certd.rollout import records as rec
from rke2certd.rollout.cluster_store import ClusterStore
from rke2certd.supervisor import MAX_CONNECTIONS, wire
from rke2certd.supervisor.choice import ServerChoice, preferred_order
from rke2certd.supervisor.cluster_api import ClusterAPI, ClusterRefused, ServedCA
from rke2certd.supervisor.fleet_limits import MIN_HOME, fleet_limits
from rke2certd.supervisor.home import SEEN_SECONDS as HOME_SEEN_SECONDS
from rke2certd.supervisor.remote import RemoteDatastore
from rke2certd.supervisor.server import start
from tests.harness.wait import HANG, in_background, wait_for

from .helpers import HOST, ServerNode, renew_agent, start_cluster_endpoint

NOW = datetime(2030, 1, 2, tzinfo=UTC)
URLS = [f"https://10.0.0.{i}:9346" for i in (1, 2, 3)]


# -- the choice (pure) ---------------------------------------------------------------------------


@pytest.mark.parametrize("n", [100, 300, 1000])
def test_a_fleet_spreads_within_20_percent(n: int) -> None:
    counts = Counter(preferred_order(URLS, f"agent-{i:04d}")[0] for i in range(n))
    assert set(counts) == set(URLS)
    assert all(abs(c - n / 3) <= 0.2 * n / 3 for c in counts.values()), counts


def test_the_choice_is_stable_and_independent_of_the_listed_order() -> None:
    seed = 20301
    print(f"seed {seed}")
    shuffled = URLS[:]
    random.Random(seed).shuffle(shuffled)
    for i in range(50):
        assert preferred_order(URLS, f"a{i}") == preferred_order(shuffled, f"a{i}")
    assert preferred_order(URLS + URLS[:1], "a1") == preferred_order(URLS, "a1")  # duplicates


def test_a_failed_servers_agents_spread_over_the_others() -> None:
    """Fail-over order is per agent: the agents of a dead server do not all land on one."""
    home = [o for i in range(600) if (o := preferred_order(URLS, f"agent-{i}"))[0] == URLS[0]]
    second = Counter(o[1] for o in home)
    assert set(second) == set(URLS[1:])
    assert min(second.values()) >= 0.35 * len(home), second


def test_removing_a_server_moves_only_its_agents() -> None:
    names = [f"agent-{i}" for i in range(300)]
    before = {a: preferred_order(URLS, a)[0] for a in names}
    after = {a: preferred_order(URLS[:2], a)[0] for a in names}
    assert all(after[a] == before[a] for a in names if before[a] != URLS[2])


def test_sticky_until_the_preferred_server_is_tried_again() -> None:
    choice = ServerChoice(URLS, prefer_again=30)
    assert choice.order(0) == URLS
    assert choice.answered(URLS[1]) == URLS[1]  # the preferred one failed; the second answered
    assert choice.order(1) == [URLS[1], URLS[0], URLS[2]]  # sticky on the one that answers
    assert choice.answered(URLS[1]) is None
    assert choice.order(29) == [URLS[1], URLS[0], URLS[2]]
    assert choice.order(30) == URLS  # home again, once per prefer_again
    assert choice.order(31)[0] == URLS[1]  # it did not answer: away again
    assert choice.order(60) == URLS
    assert choice.answered(URLS[0]) == URLS[0]  # home answered: back
    assert choice.order(61) == URLS


def test_a_late_answer_does_not_move_the_agent_back() -> None:
    choice = ServerChoice(URLS, prefer_again=30)
    away = choice.moves
    assert choice.answered(URLS[1], away) == URLS[1]  # its preferred did not answer
    sent = choice.moves  # a long poll goes to the second
    assert choice.answered(URLS[0], sent) == URLS[0]  # home again, while the poll is out
    assert choice.answered(URLS[1], sent) is None  # the poll ends: it stays home
    assert choice.current == URLS[0]
    assert choice.answered(URLS[1]) == URLS[1]  # an answer that is not late moves it


def test_a_crowded_server_is_avoided_for_a_while() -> None:
    choice = ServerChoice(URLS, prefer_again=30)
    assert choice.order(0) == URLS
    choice.crowded(URLS[0], 0)  # home has its share: the next in rank, not home
    assert choice.avoids(URLS[0], 0) and not choice.avoids(URLS[1], 0)
    assert choice.order(1)[0] == URLS[1]
    assert choice.answered(URLS[1]) == URLS[1]
    choice.crowded(URLS[1], 2)  # that one too: the third, then the crowded ones
    assert choice.order(3) == [URLS[2], URLS[0], URLS[1]]
    assert choice.answered(URLS[2]) == URLS[2]
    for url in URLS[:2]:
        choice.crowded(url, 10)
    choice.crowded(URLS[2], 10)  # every one crowded: stay (a crowded server still serves)
    assert choice.order(11)[0] == URLS[2]
    assert choice.order(41)[0] == URLS[0]  # home tried again once it is not avoided


def test_a_late_crowded_answer_does_not_send_the_agent_away() -> None:
    """A server says it is crowded as the request arrives; a long poll's answer comes up to
    25 s later. If the agent moved since (home took it), that word is stale: heeded, it sent
    the agent away from home and back at its next try, every other try."""
    choice = ServerChoice(URLS, prefer_again=30)
    sent = choice.moves  # a long poll to home, which is crowded as it arrives
    choice.crowded(URLS[0], 0, choice.moves)  # a short request is told at once: away
    assert choice.answered(URLS[1], choice.moves) == URLS[1]
    assert choice.order(30)[0] == URLS[0]  # home tried again: it has room now
    assert choice.answered(URLS[0], choice.moves) == URLS[0]
    choice.crowded(URLS[0], 31, sent)  # the poll ends, with the word as it arrived
    assert not choice.avoids(URLS[0], 31) and choice.order(32)[0] == URLS[0]
    choice.crowded(URLS[0], 33, choice.moves)  # a word that is not late is heeded
    assert choice.avoids(URLS[0], 33) and choice.order(34)[0] == URLS[1]
    choice.crowded(URLS[1], 35)  # (moves not given: heeded)
    assert choice.avoids(URLS[1], 35)


def test_a_server_takes_a_twentieth_over_its_share_as_its_own() -> None:
    assert fleet_limits(10, 3, 1024).home == MIN_HOME  # a small fleet: the hash alone
    assert fleet_limits(103, 3, 1024).home == 36  # 34.3 each; at most 36, so at least 31
    assert fleet_limits(303, 3, 1024).home == 106  # 101 each; at least 91
    assert fleet_limits(1003, 3, 1 << 20).home == 351  # 334.3 each; at least 301


def test_the_endpoint_counts_its_own_agents(tmp_path: Path) -> None:
    with SQLiteDatastore(tmp_path / "c.sqlite") as ds:
        api = ClusterAPI(ds, lambda: NOW, lambda: ServedCA(None, {}), home=2)
        assert not api.crowded("a1", 0) and not api.crowded("a2", 1)
        assert api.crowded("a3", 2)  # two are its own already
        assert not api.crowded("a1", 50)  # its own stay its own
        assert api.crowded("a3", 1 + HOME_SEEN_SECONDS)  # a2 was seen lately enough
        assert not api.crowded("a3", 2 + HOME_SEEN_SECONDS)  # a2 is gone: a3 in its place
        api.resize(MAX_CONNECTIONS, MAX_CONNECTIONS // 2, home=3)
        assert not api.crowded("a4", 3 + HOME_SEEN_SECONDS)
        assert api.crowded("a5", 4 + HOME_SEEN_SECONDS)


def test_a_full_server_keeps_the_agents_that_rank_it_highest(tmp_path: Path) -> None:
    """Agents that failed over to a server do not keep out those that prefer it: each one
    that ranks it higher takes the place of the one that ranks it lowest (seen least lately)."""
    with SQLiteDatastore(tmp_path / "c.sqlite") as ds:
        api = ClusterAPI(ds, lambda: NOW, lambda: ServedCA(None, {}), home=3)
        assert not any(api.crowded(n, t, rank=r) for t, (n, r) in enumerate(FAILED_OVER))
        assert api.crowded("f4", 3, rank=2)  # full, and nobody ranks it lower
        assert not api.crowded("p1", 4, rank=0)  # in the place of f2 (rank 2, seen before f3)
        assert api.crowded("f2", 5, rank=2)  # told at its next request
        assert not api.crowded("p2", 6, rank=0)  # f3's place
        assert not api.crowded("f1", 7, rank=1)  # still its own
        assert not api.crowded("p3", 8, rank=0)  # f1's place, the last one ranked lower
        assert api.crowded("p4", 9, rank=0) and api.crowded("f1", 10, rank=1)
        assert not api.crowded("p1", 11, rank=0)


FAILED_OVER = [("f1", 1), ("f2", 2), ("f3", 2)]


def test_an_agent_that_left_frees_its_place_at_once(tmp_path: Path) -> None:
    """`leave` (an agent gone home) frees its place for the next agent now, not when it stops
    being expected; leaving is not a request that takes a place, and only frees the caller's."""
    with SQLiteDatastore(tmp_path / "c.sqlite") as ds:
        api = ClusterAPI(ds, lambda: NOW, lambda: ServedCA(None, {}), home=1)
        assert "crowded" not in api.handle("a1", {"op": "generation", "rank": 1})
        assert api.handle("a2", {"op": "generation", "rank": 1})["crowded"] is True
        assert api.handle("a2", {"op": "leave", "rank": 1}) == {"had": False}  # not a place
        assert api.handle("a2", {"op": "generation", "rank": 1})["crowded"] is True
        assert api.handle("a1", {"op": "leave"}) == {"had": True}
        assert "crowded" not in api.handle("a2", {"op": "generation", "rank": 1})
        assert "crowded" not in api.handle("a1", {"op": "generation", "rank": 0})  # ranks higher
        assert api.handle("a2", {"op": "generation", "rank": 1})["crowded"] is True  # replaced


def test_a_long_poll_that_ends_after_the_agent_left_gives_it_no_place(
    tmp_path: Path,
) -> None:
    """An agent is counted as its request arrives: the answer to a long poll that ends after
    the agent went home and left does not bring it back as one of this server's own."""
    with SQLiteDatastore(tmp_path / "c.sqlite") as ds:
        api = ClusterAPI(ds, lambda: NOW, lambda: ServedCA(None, {}), home=1)
        rev = ds.snapshot(rec.PREFIX).revision
        watch = {"op": "watch", "prefix": wire.key_out(rec.PREFIX), "start_revision": rev + 1}
        watch["rank"] = 1
        poll = in_background(lambda: api.handle("a1", watch))
        wait_for(lambda: api._watching > 0, "the poll held")
        assert api.handle("a1", {"op": "leave"}) == {"had": True}  # gone home meanwhile
        ds.put(rec.member_key("other"), b"{}")  # the poll ends
        assert "crowded" not in poll.result()
        assert "crowded" not in api.handle("a2", {"op": "generation", "rank": 1})  # a1's place


def test_a_long_poll_crowded_as_it_arrived_is_not_once_the_agent_has_a_place(
    tmp_path: Path,
) -> None:
    """Crowded is judged as a request arrives. If a later request of the same agent took a
    place before its long poll ends (the agent holding it left), the poll's answer does not
    say crowded: the agent would leave the place it has. One that has no place is told."""
    with SQLiteDatastore(tmp_path / "c.sqlite") as ds:
        api = ClusterAPI(ds, lambda: NOW, lambda: ServedCA(None, {}), home=1)
        assert "crowded" not in api.handle("p", {"op": "generation"})  # the one place

        def poll(node: str) -> Any:
            rev = ds.snapshot(rec.PREFIX).revision
            watch = {"op": "watch", "prefix": wire.key_out(rec.PREFIX), "start_revision": rev + 1}
            held = in_background(lambda: api.handle(node, watch))
            wait_for(lambda: api._watching > 0, f"{node}'s poll held")
            return held

        x = poll("x")  # crowded as it arrives: p has the place
        assert api.handle("p", {"op": "leave"}) == {"had": True}
        assert "crowded" not in api.handle("x", {"op": "generation"})  # p's place, now x's
        ds.put(rec.member_key("other"), b"{}")  # the poll ends
        assert "crowded" not in x.result()
        y = poll("y")
        ds.put(rec.member_key("another"), b"{}")
        assert y.result()["crowded"] is True  # no place when its poll ends: told


def test_a_rank_that_is_not_a_place_is_refused(tmp_path: Path) -> None:
    with SQLiteDatastore(tmp_path / "c.sqlite") as ds:
        api = ClusterAPI(ds, lambda: NOW, lambda: ServedCA(None, {}), home=2)
        for bad in (-1, "0", 1.5, True):
            with pytest.raises(ClusterRefused) as caught:
                api.handle("a1", {"op": "generation", "rank": bad})
            assert caught.value.status == 400 and "rank" in caught.value.reason
        assert len(api._home) == 0  # nothing changed
        assert api.handle("a1", {"op": "generation", "rank": 1})["generation"] is None
        assert api.handle("a1", {"op": "generation"})["generation"] is None  # older agents


def test_supervisor_urls_are_ranked_for_the_node(tmp_path: Path) -> None:
    from tests.agent.helpers import make_agent_node

    servers = "https://s1:9345,https://s2:9345,https://s3:9345"
    node = make_agent_node(tmp_path, "K10" + "0" * 64 + "::node:pw", "agent-7", server=servers)
    urls = supervisor_urls(node.cfg)
    ranked = preferred_order(servers.split(","), "agent-7")  # as configured, RKE2's port
    assert urls == [u.replace(":9345", ":9346") for u in ranked]


# -- two real endpoints --------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteDatastore]:
    with SQLiteDatastore(tmp_path / "coord.sqlite") as ds:
        yield ds


def _remote(server: ServerNode, node: Node, urls: list[str], **options: Any) -> RemoteDatastore:
    """An agent's store through `urls`, built as its daemon builds it: the agent token, the
    CA it pins, its node password."""
    return RemoteDatastore(
        urls,
        lambda: server.agent_token,
        lambda: trusted_bundle(node),
        node.cfg.node,
        node_password=lambda: node_password(node),
        **options,
    )


def test_an_agent_moves_keeps_its_lease_and_moves_back(
    server: ServerNode,
    store: SQLiteDatastore,
    agent_factory: Callable[..., Any],
    events: list[dict[str, Any]],
) -> None:
    first, second = start_cluster_endpoint(server, store), start_cluster_endpoint(server, store)
    running = [first, second]
    try:
        node: Node = agent_factory("agent-1", supervisor_port=first.port)
        renew_agent(node)
        remote = _remote(server, node, [first.url, second.url])
        remote.choice.prefer_again = 3600
        cs = ClusterStore(remote)
        lease = remote.grant_lease(30)  # granted by the first server, which then fails
        running.remove(first)
        first.stop()
        # everything it holds goes on through the second: the lease, records on it
        cs.ensure_member(Member("agent-1", ("agent",), Phase.AGENT))
        cs.register(Registration("agent-1", ("agent",), Phase.AGENT, "t", None), lease)
        assert remote.refresh_lease(lease) > 0
        assert cs.take_slot(Slot(Phase.AGENT, 0, "agent-1", "ca-1", NOW), lease)
        cs.report(Registration("agent-1", ("agent",), Phase.AGENT, "t", "g", "ok"), lease)
        moved = [e for e in events if e["event"] == "server_chosen"]
        assert [(e["server_url"], e["preferred"]) for e in moved] == [(second.url, False)]
        assert "cannot reach" in moved[0]["reason"]
        assert remote.choice.order(0)[0] == second.url  # sticky: no try at the dead one
        reg = store.get(rec.node_key("agent-1"))
        assert reg is not None and reg.lease == lease

        # the first server returns (same port): the agent goes home at its next try there
        first = start_cluster_endpoint(server, store, port=first.port)
        running.append(first)
        remote.choice.prefer_again = 0
        assert remote.refresh_lease(lease) > 0  # a lease the restarted server never saw
        back = [e for e in events if e["event"] == "server_chosen"][1:]
        assert [(e["server_url"], e["preferred"]) for e in back] == [(first.url, True)]
        assert remote.revoke_lease(lease)
        assert store.get(rec.node_key("agent-1")) is None
    finally:
        for handle in running:
            handle.stop()


def test_a_lease_is_still_no_other_agents(
    server: ServerNode, store: SQLiteDatastore, agent_factory: Callable[..., Any]
) -> None:
    """The owner in the datastore is the granting agent's alone: another agent is refused."""
    first, second = start_cluster_endpoint(server, store), start_cluster_endpoint(server, store)
    try:
        nodes = {}
        for name in ("agent-1", "agent-2"):
            nodes[name] = agent_factory(name, supervisor_port=first.port)
            renew_agent(nodes[name])

        def remote(name: str, url: str) -> RemoteDatastore:
            return _remote(server, nodes[name], [url])

        lease = remote("agent-1", first.url).grant_lease(30)
        thief = ClusterStore(remote("agent-2", second.url))
        from rke2certd.errors import DatastoreError

        with pytest.raises(DatastoreError, match="403"):
            thief.register(Registration("agent-2", ("agent",), Phase.AGENT, "t", None), lease)
        assert store.get(rec.node_key("agent-2")) is None
    finally:
        first.stop()
        second.stop()


def test_an_agent_that_started_on_a_fallback_goes_home_by_itself(
    server: ServerNode,
    store: SQLiteDatastore,
    agent_factory: Callable[..., Any],
    events: list[dict[str, Any]],
) -> None:
    """The preferred server is not up yet when the agent starts (a fleet starting with its
    servers): the agent works through the next one, then moves back to its first choice once
    that answers, by itself (its `prefer_again`, passed in), keeping its lease."""
    first, second = start_cluster_endpoint(server, store), start_cluster_endpoint(server, store)
    first.stop()  # not up yet
    running = [second]
    try:
        node: Node = agent_factory("agent-1", supervisor_port=second.port)
        renew_agent(node)
        remote = _remote(server, node, [first.url, second.url], prefer_again=0.05)
        assert remote.choice.prefer_again == 0.05
        lease = remote.grant_lease(30)
        assert remote.choice.current == second.url  # started on the fallback
        # the preferred server comes up
        first = start_cluster_endpoint(server, store, port=first.port)
        running.append(first)

        def home_after_its_calls() -> bool:  # what the agent does anyway: its calls
            if remote.choice.current != first.url:
                assert remote.refresh_lease(lease) > 0
            return remote.choice.current == first.url

        wait_for(home_after_its_calls, "the agent back at its first choice")
        chosen = [
            (e["server_url"], e["preferred"]) for e in events if e["event"] == "server_chosen"
        ]
        assert chosen == [(second.url, False), (first.url, True)]
        assert remote.refresh_lease(lease) > 0  # the lease goes on at home
        assert remote.choice.current == first.url  # and it stays there
        assert remote.revoke_lease(lease)
    finally:
        for handle in running:
            handle.stop()


def test_a_crowded_server_sends_the_agents_beyond_its_share_to_their_next(
    server: ServerNode,
    store: SQLiteDatastore,
    agent_factory: Callable[..., Any],
    events: list[dict[str, Any]],
) -> None:
    """Three real endpoints, each taking 5 agents as its own; 12 agents, 8 of which prefer the
    first server: 3 of them are told it is crowded and settle on their next servers, served
    throughout; no server keeps more than its 5."""
    ends = [start_cluster_endpoint(server, store, home=5) for _ in range(3)]
    try:
        urls = [e.url for e in ends]
        node: Node = agent_factory("agent-x", supervisor_port=ends[0].port)
        renew_agent(node)
        want = {urls[0]: 8, urls[1]: 2, urls[2]: 2}
        names: list[str] = []
        for i in range(2000):  # the first names whose preferences fit `want`
            name = f"agent-{i}"
            home = preferred_order(urls, name)[0]
            if sum(preferred_order(urls, n)[0] == home for n in names) < want[home]:
                names.append(name)
            if len(names) == 12:
                break
        assert len(names) == 12
        remotes = {
            name: RemoteDatastore(
                preferred_order(urls, name),
                lambda: server.agent_token,
                lambda: trusted_bundle(node),
                name,
                node_password=lambda: "0" * 32,
                prefer_again=3600,
            )
            for name in names
        }
        where: dict[str, str] = {}
        for _round in range(10):  # a few calls each: each move is one request
            before = dict(where)
            for name, remote in remotes.items():
                assert remote.get(rec.node_key(name)) is None  # served, crowded or not
                where[name] = remote.choice.order(0)[0]
            if where == before:
                break
        assert where == before, "the agents did not settle"
        load = Counter(where.values())
        assert max(load.values()) <= 5 and sum(load.values()) == 12, load
        assert load[urls[0]] == 5
        movers = {e["node"] for e in events if e["event"] == "server_chosen"}
        assert len(movers) == 3 and all(preferred_order(urls, m)[0] == urls[0] for m in movers)
        reasons = {e["reason"] for e in events if e["event"] == "server_chosen"}
        assert reasons == {"the server before did not answer or is crowded"}
    finally:
        for end in ends:
            end.stop()


class _OlderAPI(ClusterAPI):
    """A server from before `leave`: it answers it as an unknown operation (400)."""

    _op_leave = None


@pytest.mark.parametrize("older", [False, True], ids=["leave", "older-server"])
def test_an_agent_gone_home_frees_its_place_on_the_other_server(
    server: ServerNode,
    store: SQLiteDatastore,
    agent_factory: Callable[..., Any],
    events: list[dict[str, Any]],
    older: bool,
) -> None:
    """Two real endpoints taking one agent each. x prefers the first, which is down when it
    starts: the second takes it as its own. The first returns; x goes home and tells the
    second it left, so y (which also prefers the first, told it is crowded there) finds x's
    place free on the second at once, not after HOME_SEEN_SECONDS: before, agents that had
    failed over and gone home kept places on every server, and those that had to move were
    told everywhere that it was crowded, and stayed, past their server's share. A server that
    does not know `leave` costs the agent nothing: x is home all the same."""
    served = lambda: ServedCA.on_disk(server.node.layout)  # noqa: E731
    api = ClusterAPI(store, lambda: NOW, served, home=1)
    other = (_OlderAPI if older else ClusterAPI)(store, lambda: NOW, served, home=1)
    first = start(server.node, host=HOST, port=0, cluster=api)
    running = [first]
    try:
        second = start(server.node, host=HOST, port=0, cluster=other)
        running.append(second)
        node: Node = agent_factory("agent-x", supervisor_port=first.port)
        renew_agent(node)

        def agent(name: str, prefer_again: float) -> RemoteDatastore:
            return RemoteDatastore(
                [first.url, second.url],
                lambda: server.agent_token,
                lambda: trusted_bundle(node),
                name,
                node_password=lambda: "0" * 32,
                prefer_again=prefer_again,
            )

        running.remove(first)
        first.stop()
        x = agent("x", prefer_again=0)
        assert x.get(rec.node_key("x")) is None
        assert x.choice.current == second.url and len(other._home) == 1
        first = start(server.node, host=HOST, port=first.port, cluster=api)  # it returns
        running.append(first)
        assert x.get(rec.node_key("x")) is None
        assert x.choice.current == first.url  # home
        if older:  # refused as unknown, in the background: the place stays until not seen
            wait_for(
                lambda: any(e["event"] == "server_leave_failed" for e in events),
                "the leave refused by the older server",
            )
            assert len(other._home) == 1 and x.choice.current == first.url
            return
        wait_for(lambda: len(other._home) == 0, "x's place on the second server freed")
        y = agent("y", prefer_again=3600)
        assert y.get(rec.node_key("y")) is None  # served, and told the first is crowded
        assert y.choice.current == first.url
        assert y.get(rec.node_key("y")) is None  # the second: x's place
        assert y.choice.current == second.url and len(other._home) == 1
        assert y.get(rec.node_key("y")) is None
        assert y.choice.current == second.url  # settled: not told it is crowded there
        assert not [e for e in events if e["event"] == "server_leave_failed"]
    finally:
        for handle in running:
            handle.stop()


def test_agents_that_failed_over_give_way_to_those_that_prefer_the_server(
    server: ServerNode,
    store: SQLiteDatastore,
    agent_factory: Callable[..., Any],
) -> None:
    """Two real endpoints taking 2 agents each. Two agents whose preferred server does not
    answer fail over to the first endpoint and fill it; the two agents that prefer it then
    take their places, and the two that failed over settle on their next server: each
    endpoint ends with 2, served throughout."""
    ends = [start_cluster_endpoint(server, store, home=2) for _ in range(2)]
    try:
        a, b = (e.url for e in ends)
        node: Node = agent_factory("agent-x", supervisor_port=ends[0].port)
        renew_agent(node)
        dead = f"https://{HOST}:1"  # nothing listens there

        def remote(name: str, urls: list[str]) -> RemoteDatastore:
            return RemoteDatastore(
                urls,
                lambda: server.agent_token,
                lambda: trusted_bundle(node),
                name,
                node_password=lambda: "0" * 32,
                prefer_again=3600,
            )

        away = {n: remote(n, [dead, a, b]) for n in ("f1", "f2")}
        home = {n: remote(n, [a, b]) for n in ("p1", "p2")}
        for name, r in away.items():
            assert r.get(rec.node_key(name)) is None
            assert r.choice.current == a  # failed over: the first endpoint's own
        for name, r in home.items():
            assert r.get(rec.node_key(name)) is None
            assert r.choice.current == a  # in the place of one that failed over
        for _round in range(3):  # told at their next request; settled at the one after
            for name, r in (away | home).items():
                assert r.get(rec.node_key(name)) is None  # served, crowded or not
        assert {n: r.choice.current for n, r in (away | home).items()} == {
            "f1": b,
            "f2": b,
            "p1": a,
            "p2": a,
        }
    finally:
        for end in ends:
            end.stop()


def test_a_long_poll_that_ends_after_the_agent_went_home_leaves_it_home(
    server: ServerNode,
    store: SQLiteDatastore,
    agent_factory: Callable[..., Any],
) -> None:
    """An agent away from its preferred server holds a long poll on the one it is on; it goes
    home at its next try there; the poll then ends with a change, on the other server: the
    agent stays home (it went back with each poll, and moved home again at each try)."""
    api = ClusterAPI(store, lambda: NOW, lambda: ServedCA.on_disk(server.node.layout))
    first, second = (
        start_cluster_endpoint(server, store),
        start(server.node, host=HOST, cluster=api),
    )
    running = [first, second]
    try:
        node: Node = agent_factory("agent-1", supervisor_port=first.port)
        renew_agent(node)
        remote = _remote(server, node, [first.url, second.url], prefer_again=0)
        running.remove(first)
        first.stop()
        rev = remote.snapshot(rec.ROLLOUTS).revision  # home does not answer: the second does
        assert remote.choice.current == second.url
        poll = in_background(lambda: remote.watch_prefix(rec.PREFIX, rev + 1, HANG))
        wait_for(lambda: api._watching > 0, "the poll held by the second server")
        first = start_cluster_endpoint(server, store, port=first.port)  # home returns
        running.append(first)
        assert remote.get(rec.node_key("agent-1")) is None  # tried home first: it answers
        assert remote.choice.current == first.url
        store.put(rec.member_key("other"), b"{}")  # the poll ends, on the second server
        assert [e.kv.key for e in poll.result()] == [rec.member_key("other")]
        assert remote.choice.current == first.url
    finally:
        for handle in running:
            handle.stop()


def test_an_agent_taken_in_while_its_poll_is_held_stays(
    server: ServerNode,
    store: SQLiteDatastore,
    agent_factory: Callable[..., Any],
) -> None:
    """A real endpoint that takes one agent as its own, held by p, and a second endpoint. The
    agent's long poll arrives at the first (its preferred): crowded. p leaves; the agent's
    next request takes the place. The poll then ends: the agent stays, and does not avoid
    its server (before, the poll's late word sent it to the second, and home again at its
    next try there: back and forth, and counted on the wrong server half the time)."""
    served = lambda: ServedCA.on_disk(server.node.layout)  # noqa: E731
    api = ClusterAPI(store, lambda: NOW, served, home=1)
    first = start(server.node, host=HOST, port=0, cluster=api)
    running = [first]
    try:
        second = start_cluster_endpoint(server, store)
        running.append(second)
        node: Node = agent_factory("agent-1", supervisor_port=first.port)
        renew_agent(node)
        assert "crowded" not in api.handle("p", {"op": "generation"})  # the one place
        remote = _remote(server, node, [first.url, second.url], prefer_again=3600)
        rev = store.snapshot(rec.PREFIX).revision
        poll = in_background(lambda: remote.watch_prefix(rec.PREFIX, rev + 1, HANG))
        wait_for(lambda: api._watching > 0, "the poll held by the first server")
        assert api.handle("p", {"op": "leave"}) == {"had": True}
        assert remote.get(rec.node_key("agent-1")) is None  # served, and taken in
        assert api._home.holds("agent-1")
        store.put(rec.member_key("other"), b"{}")  # the poll ends
        assert [e.kv.key for e in poll.result()] == [rec.member_key("other")]
        assert not remote.choice.avoids(first.url, time.monotonic())
        assert remote.get(rec.node_key("agent-1")) is None
        assert remote.choice.current == first.url and api._home.holds("agent-1")
    finally:
        for handle in running:
            handle.stop()
