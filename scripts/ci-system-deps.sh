#!/usr/bin/env bash
# Debian packages the test suite needs (idempotent; `apt-get update` at most once, and only
# when something is missing). Run as root; CI does this before the tests.
#   systemd-container  systemd-nspawn: real systemd as PID 1 for tests/systemd
#   systemd            systemd-journald, journalctl, systemd-analyze (usually present)
#   util-linux         unshare, nsenter
#   dpkg-dev           dpkg-deb, dpkg-architecture for packaging/build-deb.sh
#   python3-venv       the .deb's venv is built on Debian's python3 (not a pyenv one)
#   rpm                rpmbuild, to build packaging/rke2certd.spec in a test
#   openssl            an independent check of certificates in tests
#   procps             pgrep/ps for the harnesses
#   prometheus         promtool (tests of the shipped alert rules) and a real Prometheus that
#                      scrapes the daemon in tests/monitoring
set -euo pipefail

packages=(systemd systemd-container util-linux dpkg-dev python3 python3-venv rpm openssl procps curl prometheus)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if ((${#missing[@]} == 0)); then
  echo "ci-system-deps: all present (${packages[*]})"
  exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
  echo "ci-system-deps: missing ${missing[*]} and not root: install them with apt-get" >&2
  exit 1
fi

echo "ci-system-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "${missing[@]}"
