"""PURE: is a staged set laid out the way rotate-ca reads it (the server layout)?

rotate-ca reads <set>/tls/<ca>.crt|.key and <set>/tls/service.key; a file it does not name is
ignored, and a file it names but finds missing falls back to the current data. So a set with its
CA files in the wrong place (no tls/, or tls/ one level too deep) would read as "nothing
staged, equal to the current data": it must be refused for what it is, a wrong layout.

Rules: a file whose name is one of the rotatable names anywhere but at its place is misplaced;
a set that stages none of the rotatable files stages nothing. Other files (notes, the READY
and FORCE markers, the root/intermediate files `ca generate-custom` leaves) are ignored.
"""

from __future__ import annotations

from collections.abc import Collection

from rke2certd.plan.staged_set import ROTATABLE

LAYOUT = (
    "the layout rotate-ca reads is <set>/tls/{server-ca,client-ca,request-header-ca}.{crt,key}, "
    "<set>/tls/etcd/{server-ca,peer-ca}.{crt,key} and <set>/tls/service.key (what "
    "`rke2certd ca stage-rotation` makes)"
)
_NAMES = frozenset(rel.rsplit("/", 1)[-1] for rel in ROTATABLE)
_SHOWN = 8  # file names listed at most in one message


def _listing(paths: list[str]) -> str:
    more = f" and {len(paths) - _SHOWN} more" if len(paths) > _SHOWN else ""
    return ", ".join(paths[:_SHOWN]) + more


def layout_problems(files: Collection[str], root: str) -> list[str]:
    """Why the set at `root` (named in messages) is not laid out for rotate-ca; `files` are the
    relative paths of its regular files ("tls/server-ca.crt", …)."""
    problems = []
    misplaced = sorted(f for f in files if f not in ROTATABLE and f.rsplit("/", 1)[-1] in _NAMES)
    if misplaced:
        problems.append(
            f"{root}: wrong layout: {_listing(misplaced)} "
            f"{'is' if len(misplaced) == 1 else 'are'} not where rotate-ca reads CA files, "
            f"so {'it' if len(misplaced) == 1 else 'they'} would be ignored; {LAYOUT}"
        )
    if not any(f in ROTATABLE for f in files):
        found = _listing(sorted(files)) if files else "no files"
        problems.append(
            f"{root} stages none of the files rotate-ca takes (found: {found}); {LAYOUT}"
        )
    return problems
