"""Save and load of a realistic bootstrap value, against SQLite and a local TLS etcd.

    python benchmarks/bench_datastore.py [--rounds 200]

save = encode + encrypt (fresh salt: PBKDF2 every time, as upstream) + compare-and-swap
load = get + decrypt + decode, with the derived key cached (a node re-reading the same value)
       and cold (cache cleared first: the first read after a change)
Prints per-operation median and p90, and how much of each operation PBKDF2 is.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives.serialization import Encoding

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # for tests.harness when run as a script

from rke2certd.datastore import Datastore, SQLiteDatastore, open_datastore  # noqa: E402
from rke2certd.datastore.codec import (  # noqa: E402
    BOOTSTRAP_FIELDS,
    BootstrapFile,
    bootstrap_key_name,
    decode_bootstrap,
    decrypt,
    derive_key,
    encode_bootstrap,
    encrypt,
    passphrase_from_token,
)
from rke2certd.pki.build import self_signed_ca  # noqa: E402
from rke2certd.pki.keys import key_to_pem, new_ec_key, new_rsa_key  # noqa: E402
from tests.datastore.tls import make_etcd_pki  # noqa: E402
from tests.harness.etcd import EtcdCluster  # noqa: E402

TOKEN = "K10" + "ab" * 32 + "::server:" + "s3cr3t" * 5


def realistic_files() -> dict[str, BootstrapFile]:
    """Real CA certs and keys (P-256), an RSA 2048 service key, and the small cred files."""
    now = datetime.now(UTC)
    content: dict[str, bytes] = {}
    for field in BOOTSTRAP_FIELDS:
        if field.endswith("CA"):
            key = new_ec_key()
            cert = self_signed_ca(f"{field.lower()}@{int(now.timestamp())}", key, now)
            content[field] = cert.public_bytes(Encoding.PEM)
            content[field + "Key"] = key_to_pem(key)
    content["ServiceKey"] = key_to_pem(new_rsa_key())
    content["PasswdFile"] = b"secret,node,node,rke2:agent\nsecret,server,server,rke2:server\n"
    content["IPSECKey"] = b"0123456789abcdef" * 4 + b"\n"
    content["EncryptionConfig"] = b'{"kind":"EncryptionConfiguration","resources":[]}' * 8
    content["EncryptionHash"] = b"start-" + b"0" * 64
    return {name: BootstrapFile(now, data, 123) for name, data in content.items()}


Samples = tuple[list[float], list[float]]  # (operation, PBKDF2 alone), paired by round


def timed(
    fn: Callable[[], object], rounds: int, before: Callable[[], object] | None = None
) -> Samples:
    """Time `fn`, and an uncached PBKDF2 derivation next to it in every round, so that the
    ratio compares figures taken under the same machine load."""
    op, kdf = [], []
    passphrase = passphrase_from_token(TOKEN)
    for _ in range(rounds):
        if before:
            before()
        t0 = time.perf_counter()
        derive_key.__wrapped__(passphrase, b"0011223344556677")
        t1 = time.perf_counter()
        fn()
        t2 = time.perf_counter()
        kdf.append(t1 - t0)
        op.append(t2 - t1)
    return op, kdf


def p90(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=10)[-1]


OPERATIONS = ("save", "load (cached key)", "load (cold key)")


def bench(ds: Datastore, files: dict[str, BootstrapFile], rounds: int) -> dict[str, Samples]:
    passphrase = passphrase_from_token(TOKEN)
    key = bootstrap_key_name(passphrase)
    ds.delete(key)
    ds.create(key, b"")  # the creation lock, then the data replaces it
    state = {"rev": ds.get(key).mod_revision}  # type: ignore[union-attr]

    def save() -> None:
        value = encrypt(passphrase, encode_bootstrap(files))
        assert ds.compare_and_swap(key, value, state["rev"])
        state["rev"] += 1  # one write, one revision (nothing else writes meanwhile)

    def load() -> None:
        kv = ds.get(key)
        assert kv is not None
        assert decode_bootstrap(decrypt(passphrase, kv.value)) == files

    results = {"save": timed(save, rounds)}
    kv = ds.get(key)
    assert kv is not None and state["rev"] == kv.mod_revision
    results["load (cached key)"] = timed(load, rounds)
    results["load (cold key)"] = timed(load, rounds, before=derive_key.cache_clear)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()

    files = realistic_files()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pki = make_etcd_pki(root / "pki")
        runs: dict[str, dict[str, Samples]] = {}
        with SQLiteDatastore(root / "server" / "db" / "rke2certd.sqlite") as sqlite:
            runs["sqlite"] = bench(sqlite, files, args.rounds)
        etcd = EtcdCluster(root / "etcd", 1, server_tls=pki.server, unsafe_no_fsync=False)
        with etcd as cluster:
            ds = open_datastore(
                cluster.endpoint,
                data_dir=root,
                cafile=pki.client.ca,
                certfile=pki.client.cert,
                keyfile=pki.client.key,
            )
            with ds:
                runs["etcd (TLS, 1 member)"] = bench(ds, files, args.rounds)

    plaintext = encode_bootstrap(files)
    stored = encrypt(passphrase_from_token(TOKEN), plaintext)
    print(
        f"bootstrap value: {len(plaintext)} bytes of JSON, {len(stored)} bytes stored; "
        f"{args.rounds} rounds each; PBKDF2-HMAC-SHA1 x4096 timed beside every operation"
    )
    head = f"{'backend':22} {'operation':18} {'median ms':>9} {'p90 ms':>7} {'PBKDF2 ms':>9}"
    print(head + "  PBKDF2 / operation")
    for backend, results in runs.items():
        for op, (samples, kdf) in results.items():
            med, kdf_med = statistics.median(samples), statistics.median(kdf)
            ratio = f"{kdf_med / med:.2f}"
            if op == "load (cached key)":  # runs no PBKDF2: show what a cache miss would add
                ratio = f"0 (a miss would add {kdf_med / med:.1f}x)"
            print(
                f"{backend:22} {op:18} {med * 1e3:9.2f} {p90(samples) * 1e3:7.2f} "
                f"{kdf_med * 1e3:9.2f}  {ratio}"
            )


if __name__ == "__main__":
    main()
