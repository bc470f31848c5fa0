"""The event of a rejected staged set puts its reason first: the journal's MESSAGE lists the
fields in order and is cut at its length limit, which must fall after the reason. The summary
that result.json keeps above the reasons stays a field of its own."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rke2certd.commands.apply_staged import StagingOutcome, _new_work, file_set
from rke2certd.log import add_observer, remove_observer
from rke2certd.log.journald import journal_fields

NOW = datetime(2030, 1, 1, tzinfo=UTC)
SUMMARY = "the staged CA set was rejected, nothing changed"


def test_a_rejection_logs_its_reason_first(tmp_path: Path) -> None:
    staging = tmp_path / "incoming"
    (staging / "bad").mkdir(parents=True)
    (staging / "bad" / "server-ca.crt").write_text("not a cert")
    reasons = [SUMMARY, "tls/server-ca.key does not match tls/server-ca.crt", "x" * 3000]
    out = StagingOutcome(
        "bad", "rejected", _new_work(staging, NOW), reasons=list(reasons), summary=SUMMARY
    )
    seen: list[tuple[str, dict[str, Any]]] = []

    def observe(event: str, fields: dict[str, Any]) -> None:
        seen.append((event, dict(fields)))

    add_observer(observe)
    try:
        file_set(staging, out, NOW)
    finally:
        remove_observer(observe)
    [fields] = [f for e, f in seen if e == "staged_set_rejected"]
    assert next(iter(fields)) == "reason"
    assert fields["reason"].startswith("tls/server-ca.key does not match tls/server-ca.crt; ")
    assert fields["summary"] == SUMMARY and fields["staged_set"] == "bad"
    message = dict(journal_fields({"event": "staged_set_rejected", **fields, "level": "error"}))
    assert message["MESSAGE"].startswith(
        'staged_set_rejected reason="tls/server-ca.key does not match tls/server-ca.crt; '
    )
    assert out.filed_as is not None
    doc = json.loads((out.filed_as / "result.json").read_text())
    assert doc["reasons"][: len(reasons)] == reasons  # the filed result keeps every line
