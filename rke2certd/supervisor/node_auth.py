"""Who an agent may claim to be, and which names and addresses a server signs for it.

Node passwords. The agent token is shared by every agent, so it cannot say which node is asking.
As RKE2 does, each agent keeps a random password of its own (`/etc/rancher/node/password`,
created at first need, mode 0600) and sends it with its node name (`rke2-Node-Password`). The
first request for a name records a salted scrypt hash of that password in the datastore
(`records.node_password_key`); later requests for the name must send the same password, else
403. Every server shares the record, so an agent proves its name to all of them. A verified
(name, password) pair is remembered in memory against the stored record's bytes, so scrypt runs
once per node and server, not per request.

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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from rke2certd.datastore.base import Datastore
from rke2certd.plan.rollout import SERVER_PHASES
from rke2certd.rollout import records as rec

# scrypt: ~16 MiB and tens of milliseconds per hash; a node password is 128 random bits, so the
# cost guards only against a weak password chosen by hand.
_SCRYPT = {"n": 2**14, "r": 8, "p": 1}
_KIND = "NodePassword"
MAX_PASSWORD = 256
KUBELET_LOOPBACK = ("127.0.0.1",)  # what an agent's kubelet certs carry besides its own IPs


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


@dataclass
class NodePasswords:
    """First use wins, a different password later is refused; the records live in `ds`."""

    ds: Datastore
    own_name: str  # this server's node name: never an agent's

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        # One scrypt at a time: requests with wrong passwords (a token holder can send many)
        # cost one core at most, never all of them.
        self._hashing = threading.Lock()
        self._verified: dict[str, tuple[bytes, bytes]] = {}  # name -> (record, fingerprint)

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
        self.refuse_server_name(name)
        key = rec.node_password_key(name)
        kv = self.ds.get(key)
        if kv is None:
            with self._hashing:
                record = hash_record(password)
            if self.ds.create(key, record):
                self._remember(name, record, password)
                return
            kv = self.ds.get(key)  # another server recorded it first: check against that
            if kv is None:
                raise NodeRefused(503, f"the node password of {name} could not be recorded")
        with self._lock:
            known = self._verified.get(name)
        if known is not None and known[0] == kv.value:
            if hmac.compare_digest(known[1], _fingerprint(password)):
                return
        else:
            with self._hashing:
                ok = matches(kv.value, password)
            if ok:
                self._remember(name, kv.value, password)
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

    def _remember(self, name: str, record: bytes, password: str) -> None:
        with self._lock:
            self._verified[name] = (record, _fingerprint(password))


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
