"""Service-account key rotation: tokens signed with the old key keep verifying."""

from __future__ import annotations

import base64
import json
from datetime import datetime
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from rke2certd.commands.stage_rotation import stage_service_key
from rke2certd.errors import UsageError
from rke2certd.node.staged_read import current_files, read_staged_dir
from rke2certd.pki.keys import load_keys, public_der
from rke2certd.pki.layout import Layout
from rke2certd.plan.staged_set import validate_staged_set

from .support import make_upstream_node


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign_jwt(key: rsa.RSAPrivateKey, claims: dict[str, object]) -> str:
    """An RS256 JWT built by hand, as kube-apiserver issues service-account tokens."""
    header = _b64(json.dumps({"alg": "RS256", "typ": "JWT"}).encode())
    payload = _b64(json.dumps(claims).encode())
    signing_input = f"{header}.{payload}".encode()
    signature = key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
    return f"{header}.{payload}.{_b64(signature)}"


def verifies(token: str, public: rsa.RSAPublicKey) -> bool:
    header, payload, signature = token.split(".")
    try:
        public.verify(
            _unb64(signature), f"{header}.{payload}".encode(), padding.PKCS1v15(), hashes.SHA256()
        )
    except InvalidSignature:
        return False
    return True


def test_old_tokens_verify_with_the_new_service_key(tmp_path: Path, now: datetime) -> None:
    layout = make_upstream_node(tmp_path / "data")
    old_keys = load_keys(layout.service_key.read_bytes(), "old")
    old_signer = old_keys[0]
    assert isinstance(old_signer, rsa.RSAPrivateKey)
    token = sign_jwt(old_signer, {"sub": "system:serviceaccount:default:default", "iat": 1})

    result = stage_service_key(layout.data_dir, tmp_path / "staged")
    new_file = tmp_path / "staged" / "tls" / "service.key"
    assert result.written == (new_file,)
    assert new_file.stat().st_mode & 0o777 == 0o600
    new_keys = load_keys(new_file.read_bytes(), "new")
    publics = [k.public_key() for k in new_keys]
    assert all(isinstance(p, rsa.RSAPublicKey) for p in publics)
    assert any(verifies(token, p) for p in publics if isinstance(p, rsa.RSAPublicKey))
    # The new first key (the one renew hands to RKE2 as service.current.key) is a new signer.
    first = new_keys[0]
    assert isinstance(first, rsa.RSAPrivateKey) and first.key_size == 2048
    assert public_der(first) != public_der(old_signer)
    assert not verifies(token, first.public_key())
    assert verifies(sign_jwt(first, {"sub": "x"}), first.public_key())

    # rotate-ca's checks accept a service.key-only set; the CAs pass on current data.
    checks = validate_staged_set(
        read_staged_dir(tmp_path / "staged"), current_files(layout.tls), now
    )
    assert checks.problems == ()
    assert checks.changed == ("tls/service.key",)
    assert sum("using current data" in w for w in checks.warnings) == 10


def test_stage_service_key_refuses_the_live_dir(tmp_path: Path) -> None:
    layout = make_upstream_node(tmp_path / "data")
    before = layout.service_key.read_bytes()
    for out in (layout.server, layout.tls):
        with pytest.raises(UsageError, match="refusing to stage"):
            stage_service_key(layout.data_dir, out)
    assert layout.service_key.read_bytes() == before


def test_second_service_key_rotation_keeps_every_key(tmp_path: Path) -> None:
    layout = make_upstream_node(tmp_path / "data")
    stage_service_key(layout.data_dir, tmp_path / "s1")
    layout.service_key.write_bytes((tmp_path / "s1" / "tls" / "service.key").read_bytes())
    stage_service_key(layout.data_dir, tmp_path / "s2")
    keys = load_keys((tmp_path / "s2" / "tls" / "service.key").read_bytes(), "s2")
    assert len(keys) == 3
    assert Layout(layout.data_dir).service_key.exists()
