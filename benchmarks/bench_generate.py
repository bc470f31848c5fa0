"""`ca stage-rotation` and `ca generate-custom` against the openssl command sequences that
upstream's example scripts run (same key types), measured in the same run.

    python benchmarks/bench_generate.py [--runs N]

Each side is run N times, alternating, and the medians are compared. The openssl side is a bash
script doing what upstream's scripts do (one openssl process per key, CSR and signature, an
`openssl ca` database for the signatures); it is ours, written from the scripts' steps.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import structlog

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rke2certd.commands.generate_custom import generate_custom  # noqa: E402
from rke2certd.commands.stage_rotation import stage_rotation  # noqa: E402
from tests.rotation.support import make_upstream_node  # noqa: E402

CA_CONFIG = """\
[ca]
default_ca = ca_default
[ca_default]
dir = ./.ca
database = $dir/index
serial = $dir/serial
new_certs_dir = $dir/certs
default_md = sha256
policy = policy_anything
[policy_anything]
commonName = supplied
[req]
distinguished_name = req_distinguished_name
[req_distinguished_name]
[v3_ca]
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
basicConstraints = critical, CA:true
keyUsage = critical, digitalSignature, keyEncipherment, keyCertSign
"""

# The per-CA loop of the rotation: new root, cross-signed root, intermediate, bundle, keys.
ROTATION_SH = r"""
set -euo pipefail
cd "$OUT"
mkdir -p .ca/certs etcd && touch .ca/index && openssl rand -hex 8 > .ca/serial
cp "$CONFIG" .ca/config
TS=$(date +%s)
for T in client server request-header etcd/peer etcd/server; do
  N=$(echo $T | tr / -)
  cp "$TLS/$T-ca.crt" $T-old.pem; cp "$TLS/$T-ca.key" $T-old.key
  openssl ecparam -name prime256v1 -genkey -noout -out $T-root.key
  openssl req -x509 -new -nodes -sha256 -days 7300 -subj "/CN=rke2-$N-root@$TS" \
    -key $T-root.key -out $T-root-ss.pem -config .ca/config -extensions v3_ca
  openssl req -new -nodes -subj "/CN=rke2-$N-root@$TS" -key $T-root.key |
    openssl ca -batch -notext -days 7300 -in /dev/stdin -out $T-root-xs.pem \
      -keyfile $T-old.key -cert $T-old.pem -config .ca/config -extensions v3_ca 2>/dev/null
  openssl ecparam -name prime256v1 -genkey -noout -out $T-ca.key
  openssl req -new -nodes -subj "/CN=rke2-$N-ca@$TS" -key $T-ca.key |
    openssl ca -batch -notext -days 7300 -in /dev/stdin -out $T-ca.pem \
      -keyfile $T-root.key -cert $T-root-ss.pem -config .ca/config -extensions v3_ca 2>/dev/null
  cat $T-ca.pem $T-root-xs.pem $T-root-ss.pem $T-old.pem > $T-ca.crt
  cat $T-root.key >> $T-ca.key
done
openssl genrsa -traditional -out service.key 2048 2>/dev/null
cat "$TLS/service.key" >> service.key
openssl x509 -noout -fingerprint -sha256 -in server-ca.pem > /dev/null
"""

# The custom CA set: root, intermediate, five P-256 CAs signed by it, service.key.
CUSTOM_SH = r"""
set -euo pipefail
cd "$OUT"
mkdir -p .ca/certs etcd && touch .ca/index && openssl rand -hex 8 > .ca/serial
cp "$CONFIG" .ca/config
TS=$(date +%s)
newkey() {
  if [ "$KEYTYPE" = rsa4096 ]; then openssl genrsa -traditional -out "$1" 4096 2>/dev/null
  else openssl ecparam -name prime256v1 -genkey -noout -out "$1"; fi
}
openssl genrsa -traditional -out service.key 2048 2>/dev/null
newkey root-ca.key
openssl req -x509 -new -nodes -sha256 -days 7300 -subj "/CN=rke2-root-ca@$TS" \
  -key root-ca.key -out root-ca.pem -config .ca/config -extensions v3_ca
newkey intermediate-ca.key
openssl req -new -nodes -subj "/CN=rke2-intermediate-ca@$TS" -key intermediate-ca.key |
  openssl ca -batch -notext -days 3700 -in /dev/stdin -out intermediate-ca.pem \
    -keyfile root-ca.key -cert root-ca.pem -config .ca/config -extensions v3_ca 2>/dev/null
for T in client server request-header etcd/peer etcd/server; do
  N=$(echo $T | tr / -)
  openssl ecparam -name prime256v1 -genkey -noout -out $T-ca.key
  openssl req -new -nodes -subj "/CN=rke2-$N-ca@$TS" -key $T-ca.key |
    openssl ca -batch -notext -days 3700 -in /dev/stdin -out $T-ca.pem \
      -keyfile intermediate-ca.key -cert intermediate-ca.pem -config .ca/config \
      -extensions v3_ca 2>/dev/null
  cat $T-ca.pem intermediate-ca.pem root-ca.pem > $T-ca.crt
done
"""


def run_shell(script: str, **env: str) -> None:
    subprocess.run(["bash", "-c", script], env={"PATH": "/usr/bin:/bin", **env}, check=True)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench(
    name: str,
    ours: Callable[[Path], object],
    theirs: Callable[[Path], object],
    work: Path,
    runs: int,
) -> None:
    ours_t: list[float] = []
    theirs_t: list[float] = []
    for i in range(runs):
        for label, fn, out in (("o", ours, ours_t), ("s", theirs, theirs_t)):
            target = work / f"{name}-{label}{i}"
            target.mkdir(parents=True)
            out.append(timed(lambda fn=fn, target=target: fn(target)))  # type: ignore[misc]
            shutil.rmtree(target)
    mo, ms = statistics.median(ours_t), statistics.median(theirs_t)
    print(
        f"{name:<28} rke2certd {mo * 1000:8.1f} ms   openssl sequence {ms * 1000:8.1f} ms   "
        f"ratio openssl/rke2certd {ms / mo:5.2f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    structlog.configure(logger_factory=structlog.ReturnLoggerFactory())  # quiet
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        config = work / "ca.cnf"
        config.write_text(CA_CONFIG)
        layout = make_upstream_node(work / "data")
        version = subprocess.run(["openssl", "version"], capture_output=True, text=True)
        print(f"{version.stdout.strip()}; runs: {args.runs}, medians compared")

        bench(
            "stage-rotation (P-256+RSA2048)",
            lambda out: stage_rotation(layout.data_dir, out, datetime.now(UTC), "pw"),
            lambda out: run_shell(
                ROTATION_SH, OUT=str(out), TLS=str(layout.tls), CONFIG=str(config)
            ),
            work,
            args.runs,
        )
        for key_type in ("ecdsa-p256", "rsa4096"):
            bench(
                f"generate-custom ({key_type})",
                lambda out, kt=key_type: generate_custom(  # type: ignore[misc]
                    out / "tls", datetime.now(UTC), kt, data_dir=work / "nodata"
                ),
                lambda out, kt=key_type: run_shell(  # type: ignore[misc]
                    CUSTOM_SH, OUT=str(out), KEYTYPE=kt, CONFIG=str(config)
                ),
                work,
                args.runs,
            )


if __name__ == "__main__":
    main()
