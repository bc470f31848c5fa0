"""Who an agent may claim to be, and which names and addresses a server signs for it.

Node passwords. The agent token is shared by every agent, so it cannot say which node is asking.
As RKE2 does, each agent keeps a random password of its own (`/etc/rancher/node/password`,
created at first need, mode 0600) and sends it with its node name (`rke2-Node-Password`). The
first request for a name records a salted scrypt hash of that password in the datastore
(`records.node_password_key`); later requests for the name must send the same password, else
403. Every server shares the record, so an agent proves its name to all of them. A verified
(name, password) pair is remembered in memory against the stored record's bytes, so scrypt runs
once per node and server, not per request; and for PROOF_TTL after a full check the same pair is
taken on trust without reading the datastore at all (a removed node's old password, or a name
that became a server's, is noticed here at the next full check).

Server names. A node whose membership or registration in the datastore says it is a server (etcd
or control-plane phase), and this server's own name, is never an agent's to claim: its records
and its kubelet certificates belong to its own rke2certd, which uses the datastore directly.

SANs. `refused_sans` (pure) lists every reason a serving cert for the given names and IPs must
not be signed: the apiserver's names, anything in the cluster domain, this server's own names and
addresses, service-CIDR IPs, unspecified, broadcast, multicast, zoned link-local, and loopback
other than 127.0.0.1 (the one an agent's kubelet certs have always carried).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import json
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from rke2certd.datastore.base import Datastore
from rke2certd.plan.rollout import SERVER_PHASES
from rke2certd.rollout import records as rec

# scrypt: ~16 MiB and tens of milliseconds per hash; a node password is 128 random bits, so the
# cost guards only against a weak password chosen by hand.
_SCRYPT = {"n": 2**14, "r": 8, "p": 1}
_KIND = "NodePassword"
MAX_PASSWORD = 256
KUBELET_LOOPBACK = ("127.0.0.1",)  # what an agent's kubelet certs carry besides its own IPs
# How long a full check's proof of (name, password) stands without reading the datastore again:
# longer than an idle agent's gap between requests (lease refresh every 10 s, a poll every 25 s),
# so most of its requests read nothing; short enough that `rke2certd node remove`, or the name
# turning out to be a server's, takes effect on every server within half a minute.
PROOF_TTL = 30.0
# Memory: when the table reaches its mark, proofs not renewed for this long (the node left, or
# stopped asking) are dropped and the mark set to twice what is left: a table at most about
# twice the names proven within that time, pruned at an amortised O(1) per proof.
FORGET_AFTER = 4 * PROOF_TTL
MIN_PRUNE_MARK = 1024


class NodeRefused(Exception):
    """The request may not act as that node: an HTTP status and a reason for the operator."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


# The stored record -----------------------------------------------------------------------------


def hash_record(password: str, salt: bytes | None = None) -> bytes:
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, dklen=32, **_SCRYPT)
    doc = {
        "apiVersion": rec.API_VERSION,
        "kind": _KIND,
        "scheme": "scrypt",
        **_SCRYPT,
        "salt": base64.b64encode(salt).decode(),
        "hash": base64.b64encode(digest).decode(),
    }
    return json.dumps(doc, sort_keys=True).encode()


def matches(record: bytes, password: str) -> bool:
    """Whether `password` is the one `record` was made from (False for a record unreadable)."""
    try:
        doc = json.loads(record)
        if doc.get("kind") != _KIND or doc.get("scheme") != "scrypt":
            return False
        salt = base64.b64decode(doc["salt"], validate=True)
        want = base64.b64decode(doc["hash"], validate=True)
        n, r, p = int(doc["n"]), int(doc["r"]), int(doc["p"])
        if not (2 <= n <= 2**20 and 1 <= r <= 32 and 1 <= p <= 16):
            return False
        got = hashlib.scrypt(password.encode(), salt=salt, dklen=len(want), n=n, r=r, p=p)
    except (ValueError, KeyError, TypeError, binascii.Error, AttributeError):
        return False
    return hmac.compare_digest(got, want)


def _fingerprint(password: str) -> bytes:
    return hashlib.sha256(password.encode()).digest()


@dataclass(frozen=True)
class _Proof:
    record: bytes  # the stored record the password was checked against
    fingerprint: bytes  # sha256 of the password
    checked: float  # when, on NodePasswords.clock


@dataclass
class NodePasswords:
    """First use wins, a different password later is refused; the records live in `ds`."""

    ds: Datastore
    own_name: str  # this server's node name: never an agent's
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)  # seconds, monotonic

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        # One scrypt at a time: requests with wrong passwords (a token holder can send many)
        # cost one core at most, never all of them.
        self._hashing = threading.Lock()
        self._proofs: dict[str, _Proof] = {}  # successful full checks only, never a refusal
        self._prune_mark = MIN_PRUNE_MARK

    def check(self, name: str, password: str | None) -> None:
        """Raises NodeRefused unless `password` proves `name` (recording it at first use)."""
        if not password:
            raise NodeRefused(
                400,
                "the rke2-Node-Password header is required (the agent's node password, "
                "/etc/rancher/node/password); upgrade rke2certd on this agent",
            )
        if len(password) > MAX_PASSWORD or not password.isprintable():
            raise NodeRefused(400, "the node password is not usable (printable, <= 256 chars)")
        fingerprint, now = _fingerprint(password), self.clock()
        with self._lock:
            proof = self._proofs.get(name)
        if (
            proof is not None
            and 0 <= now - proof.checked < PROOF_TTL
            and hmac.compare_digest(proof.fingerprint, fingerprint)
        ):
            return
        try:
            self._check_fully(name, password, fingerprint, now, proof)
        except NodeRefused:
            if proof is not None and hmac.compare_digest(proof.fingerprint, fingerprint):
                self._forget(name)  # its own password no longer proves it: removed, or a server
            raise

    def _check_fully(
        self, name: str, password: str, fingerprint: bytes, now: float, known: _Proof | None
    ) -> None:
        self.refuse_server_name(name)
        key = rec.node_password_key(name)
        kv = self.ds.get(key)
        if kv is None:
            with self._hashing:
                record = hash_record(password)
            if self.ds.create(key, record):
                self._remember(name, _Proof(record, fingerprint, now))
                return
            kv = self.ds.get(key)  # another server recorded it first: check against that
            if kv is None:
                raise NodeRefused(503, f"the node password of {name} could not be recorded")
        if known is not None and known.record == kv.value:
            # the record this server verified before: only the password it verified matches
            if hmac.compare_digest(known.fingerprint, fingerprint):
                self._remember(name, _Proof(kv.value, fingerprint, now))
                return
        else:
            if known is not None:
                self._forget(name)  # the record changed (node remove, a new registration)
            with self._hashing:
                ok = matches(kv.value, password)
            if ok:
                self._remember(name, _Proof(kv.value, fingerprint, now))
                return
        raise NodeRefused(
            403,
            f"node {name} is already registered with another node password; another "
            "node uses this name, or this agent's /etc/rancher/node/password changed (remove "
            "the node with `rke2certd node remove` to let it register again)",
        )

    def refuse_server_name(self, name: str) -> None:
        if name == self.own_name or _is_server(self.ds, name):
            raise NodeRefused(403, f"{name} is a server node: an agent may not act as it")

    @property
    def proven(self) -> int:
        """How many names this server holds a proof for (tests, metrics)."""
        with self._lock:
            return len(self._proofs)

    def _remember(self, name: str, proof: _Proof) -> None:
        with self._lock:
            self._proofs[name] = proof
            if len(self._proofs) < self._prune_mark:
                return
            now = self.clock()
            self._proofs = {
                n: p for n, p in self._proofs.items() if 0 <= now - p.checked < FORGET_AFTER
            }
            self._prune_mark = max(MIN_PRUNE_MARK, 2 * len(self._proofs))

    def _forget(self, name: str) -> None:
        with self._lock:
            self._proofs.pop(name, None)


def _is_server(ds: Datastore, name: str) -> bool:
    for key, decode in (
        (rec.member_key(name), rec.decode_member),
        (rec.node_key(name), rec.decode_registration),
    ):
        kv = ds.get(key)
        if kv is None:
            continue
        try:
            if decode(kv).phase in SERVER_PHASES:
                return True
        except (ValueError, KeyError, TypeError):
            return True  # unreadable: not provably an agent's
    return False


# Which SANs a server signs for an agent ----------------------------------------------------------


@dataclass(frozen=True)
class SanPolicy:
    """What an agent's serving cert may never name, from the server's configuration."""

    cluster_domain: str
    service_cidrs: tuple[str, ...]
    server_names: tuple[str, ...] = ()  # this server's own SANs (names and IPs)


_APISERVER_FIRST_LABEL = "kubernetes"


def _name_reasons(name: str, policy: SanPolicy) -> list[str]:
    out = []
    lowered = name.lower().rstrip(".")
    domain = policy.cluster_domain.lower().strip(".")
    if lowered.split(".")[0] == _APISERVER_FIRST_LABEL:
        out.append(f"{name}: an apiserver name (kubernetes, kubernetes.*)")
    if domain and (lowered == domain or lowered.endswith("." + domain)):
        out.append(f"{name}: a name in the cluster domain {domain}")
    if lowered != "localhost" and lowered in {s.lower() for s in policy.server_names}:
        out.append(f"{name}: a name of this server")
    return out


def _ip_reasons(text: str, policy: SanPolicy) -> list[str]:
    ip = ipaddress.ip_address(text)
    scope = getattr(ip, "scope_id", None)
    plain = ipaddress.ip_address(text.split("%")[0])
    if isinstance(plain, ipaddress.IPv6Address) and plain.ipv4_mapped is not None:
        plain = plain.ipv4_mapped
    out = []
    if plain.is_unspecified:
        out.append(f"{text}: the unspecified address")
    if plain == ipaddress.IPv4Address("255.255.255.255"):
        out.append(f"{text}: the broadcast address")
    if plain.is_multicast:
        out.append(f"{text}: a multicast address")
    if scope:
        out.append(f"{text}: a link-local address with a zone")
    if plain.is_loopback and str(plain) not in KUBELET_LOOPBACK:
        out.append(f"{text}: a loopback address other than {', '.join(KUBELET_LOOPBACK)}")
    for cidr in policy.service_cidrs:
        net = ipaddress.ip_network(cidr, strict=False)
        if plain.version == net.version and plain in net:
            out.append(f"{text}: in the service CIDR {cidr}")
    own = {s for s in policy.server_names if _is_ip(s)}
    if str(plain) not in KUBELET_LOOPBACK and any(ipaddress.ip_address(s) == plain for s in own):
        out.append(f"{text}: an address of this server")
    return out


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def refused_sans(names: Iterable[str], ips: Sequence[str], policy: SanPolicy) -> list[str]:
    """Every reason not to sign a cert for these DNS names and IP addresses (empty: fine). A name
    that is an IP address is judged as one."""
    out: list[str] = []
    for name in names:
        out += _ip_reasons(name, policy) if _is_ip(name) else _name_reasons(name, policy)
    for ip in ips:
        out += _ip_reasons(ip, policy)
    return list(dict.fromkeys(out))
