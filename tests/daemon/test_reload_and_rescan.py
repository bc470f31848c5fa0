"""SIGHUP re-reads the config and renews what entered the renewal window; the periodic rescan
renews what entered it meanwhile and says which RKE2 units must restart. A leaf is made to
expire sooner with the openssl CLI (same key, subject, extensions and CA), so only the window
decides."""

from __future__ import annotations

import signal
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509

from tests.daemon.support import DaemonNode, cert_serial, reissue_shorter


def not_after(path: Path) -> datetime:
    return x509.load_pem_x509_certificate(path.read_bytes()).not_valid_after_utc


def shorten(node: DaemonNode, leaf: str, ca: str, days: int) -> str:
    """Re-sign `<data>/<leaf>.crt` for `days`; its new serial."""
    cert = node.data / f"{leaf}.crt"
    reissue_shorter(
        cert,
        node.data / f"{leaf}.key",
        node.data / f"server/tls/{ca}.crt",
        node.data / f"server/tls/{ca}.key",
        days=days,
    )
    return cert_serial(cert)


def test_sighup_rereads_the_config_and_renews_a_cert_that_entered_the_window(
    node: DaemonNode,
) -> None:
    node.cli("renew")
    kubelet = node.data / "agent/client-kubelet.crt"
    short = shorten(node, "agent/client-kubelet", "client-ca", days=200)
    with node.daemon() as d:
        d.notify.expect("READY")
        # 200 days left is outside the 90-day window: start-up kept it
        assert cert_serial(kubelet) == short
        assert not d.events("cert_renewed")

        node.write_config(renew_before_days=250)
        d.signal(signal.SIGHUP)
        d.notify.expect("RELOADING")
        ready = d.notify.expect("READY")  # the reload is done
        renewed = d.wait_event("cert_renewed", cert_path=str(kubelet))
        # renewed for the new window: 200 days left, inside 250 days, outside the old 90
        left = datetime.fromisoformat(renewed["old_not_after"]) - datetime.now(UTC)
        assert timedelta(days=90) < left <= timedelta(days=250), left
        assert renewed["cert_service"] == "kubelet"
        assert renewed["old_serial"].lower().lstrip("0") == short.lstrip("0")
        new = cert_serial(kubelet)
        assert new != short and renewed["cert_serial"].lower().lstrip("0") == new.lstrip("0")
        assert not_after(kubelet) > datetime.now(UTC) + timedelta(days=360)
        # only that leaf: the others have a year left
        assert [e["cert_path"] for e in d.events("cert_renewed")] == [str(kubelet)]
        restart = d.wait_event("restart_needed", reason="reload")
        assert "rke2-server" in restart["units"]
        names = [e["event"] for e in d.events()]
        assert names.index("reloading") < names.index("cert_renewed")
        assert "next expiry" in ready.fields["STATUS"]
        assert d.stop() == 0


def test_a_bad_config_on_sighup_keeps_the_daemon_running_on_the_old_one(node: DaemonNode) -> None:
    with node.daemon() as d:
        d.notify.expect("READY")
        node.config.write_text("renew-before-days: [not, a, number]\n")
        d.signal(signal.SIGHUP)
        d.notify.expect("RELOADING")
        ready = d.notify.expect("READY")
        failed = d.wait_event("reload_failed")
        assert "renew-before-days" in failed["reason"]
        assert f"watching {node.incoming}" in ready.fields["STATUS"]
        assert d.proc.poll() is None
        assert d.stop() == 0


def test_the_periodic_rescan_renews_what_entered_the_window_and_names_the_units(
    node: DaemonNode,
) -> None:
    node.cli("renew")
    node.write_config(rescan_interval=1)
    with node.daemon() as d:
        d.notify.expect("READY")
        apiserver = node.data / "server/tls/serving-kube-apiserver.crt"
        before = shorten(node, "server/tls/serving-kube-apiserver", "server-ca", days=30)
        # renewed by a rescan (the reason below says which wake found it), however late
        renewed = d.wait_event("cert_renewed", cert_path=str(apiserver))
        # renewed for the window (30 days left, inside 90), the one it came from
        left = datetime.fromisoformat(renewed["old_not_after"]) - datetime.now(UTC)
        assert left <= timedelta(days=90), left
        assert renewed["old_serial"].lower().lstrip("0") == before.lower().lstrip("0")
        assert cert_serial(apiserver) != before
        restart = d.wait_event("restart_needed", reason="periodic rescan")
        assert restart["units"] == "rke2-server" and restart["files"] >= 1
        assert d.stop() == 0
