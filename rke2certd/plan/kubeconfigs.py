"""PURE: the kubeconfig inventory of `certificate check`, one entry per client cert a kubeconfig
names (a file) or embeds (`client-certificate-data`).

The certificate rows stay upstream's (one per cert file); this says, per kubeconfig, which cert
its component will present and whether that is still the right one: a kubeconfig naming a file
that is gone, a cert that expired or is inside the renewal window, a cert that is not the
node's current leaf any more, or one issued by another CA than the current one."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from rke2certd.plan.inventory import CertFacts, Status, status

EMBEDDED = "embedded"
MISSING = "MISSING"  # the status of an entry whose cert could not be read
# statuses that make `check` fail (verdict CRITICAL; default exit code 1)
CRITICAL = (Status.EXPIRED.value, Status.NOT_YET_VALID.value, Status.CHAIN_BROKEN.value)


@dataclass(frozen=True)
class KubeconfigRead:
    """What the shell read about one client cert of a kubeconfig (ops/node_files.py)."""

    path: str
    service: str
    cert: str  # the file it names, EMBEDDED, or "" (no client cert: a token, say)
    ca: str  # the CA file it names, EMBEDDED, or ""
    facts: CertFacts | None  # the client cert (its first certificate); None: not read
    unreadable: str = ""  # why the cert could not be read
    # what it is judged against (None / "": no expectation, e.g. a `watch-files` copy)
    leaf_file: str = ""  # the node's current leaf for this kubeconfig
    leaf_serial: str | None = None
    signers: tuple[str, ...] = ()  # CNs of the CAs that sign that leaf now (its CA file)
    ca_current: bool | None = None  # the CA it names is the node's current server CA
    ca_problem: str = ""  # the CA it names could not be read


@dataclass(frozen=True)
class KubeconfigEntry:
    path: str
    service: str
    cert: str
    ca: str
    subject: str
    not_after: datetime | None
    residual: timedelta | None
    status: str  # a certificate Status value, or MISSING
    problem: str  # what is wrong, every reason, or ""

    @property
    def critical(self) -> bool:
        return self.status in CRITICAL

    @property
    def warning(self) -> bool:
        return not self.critical and self.status != MISSING and bool(self.problem)


def judge(read: KubeconfigRead, now: datetime, window: timedelta) -> KubeconfigEntry:
    """The entry of one client cert: its status is the cert's, CHAIN BROKEN when another CA
    issued it, WARNING for a valid cert that is not the current leaf or a CA that is not the
    current one, MISSING when it could not be read."""
    facts = read.facts
    if facts is None:
        return KubeconfigEntry(
            read.path,
            read.service,
            read.cert,
            read.ca,
            "",
            None,
            None,
            MISSING if read.unreadable else Status.OK.value,
            read.unreadable,
        )
    problems: list[str] = []
    st = status(facts, now, window)
    word = st.value
    match st:
        case Status.EXPIRED:
            problems.append(f"its client certificate expired at {facts.not_after.isoformat()}")
        case Status.NOT_YET_VALID:
            problems.append("its client certificate is not valid yet")
        case Status.WARNING:
            problems.append(f"its client certificate expires within {window.days} days")
    if read.signers and facts.issuer not in read.signers:
        now_by = " or ".join(read.signers)
        problems.append(f"its client certificate was issued by {facts.issuer}, not {now_by}")
        if st in (Status.OK, Status.WARNING):
            word = Status.CHAIN_BROKEN.value
    if read.leaf_serial is not None and facts.serial != read.leaf_serial:
        problems.append(f"its client certificate is not the current {read.leaf_file}")
        if word == Status.OK.value:
            word = Status.WARNING.value
    if read.ca_problem or read.ca_current is False:
        problems.append(read.ca_problem or "its certificate authority is not the current server CA")
        if word == Status.OK.value:
            word = Status.WARNING.value
    return KubeconfigEntry(
        read.path,
        read.service,
        read.cert,
        read.ca,
        facts.subject,
        facts.not_after,
        facts.not_after - now,
        word,
        "; ".join(problems),
    )
