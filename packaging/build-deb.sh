#!/usr/bin/env bash
# Build dist/rke2certd_<version>_<arch>.deb: one command, from the repo, with dpkg-deb.
#   packaging/build-deb.sh [OUTDIR]
# See stage.sh for the layout and how the venv is built at /opt/rke2certd. Python deps come from
# PyPI through pip (the versions pyproject.toml allows; pass PIP_ARGS="-c constraints.txt" to pin).
# Needs: dpkg-deb, python3 + python3-venv, unshare (root or user namespaces).
set -euo pipefail
umask 022

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
outdir=${1:-$repo/dist}
python=$(readlink -f "${PYTHON:-/usr/bin/python3}")
pyver=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
# PEP 440 pre-releases sort before the release in Debian only with "~"
version=$("$python" -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' \
  "$repo/pyproject.toml" | sed -E 's/\.?(dev|a|b|rc)([0-9]+)/~\1\2/')
arch=$(dpkg --print-architecture)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/root
PYTHON=$python UNITDIR=/lib/systemd/system TMPFILESDIR=/usr/lib/tmpfiles.d \
  "$repo/packaging/stage.sh" "$root"

install -d -m 0755 "$root/DEBIAN"
printf '%s\n' /etc/rke2certd/config.yaml >"$root/DEBIAN/conffiles"
cat >"$root/DEBIAN/control" <<CONTROL
Package: rke2certd
Version: $version
Architecture: $arch
Maintainer: rke2certd developers <rke2certd@localhost>
Depends: python$pyver, libc6
Recommends: systemd
Section: admin
Priority: optional
Installed-Size: $(du -sk --exclude=DEBIAN "$root" | cut -f1)
Homepage: https://github.com/rke2certd/rke2certd
Description: RKE2 certificate daemon
 Keeps an RKE2 node's certificates valid and rotates its certificate
 authorities safely, in the right order across the cluster. Ships its own
 Python environment in /opt/rke2certd, a systemd unit (Type=notify) and
 ExecStartPre= drop-ins for rke2-server and rke2-agent.
CONTROL

# Maintainer scripts: act on systemd only when it runs (a container or chroot has none), and
# never fail the package operation because of it.
cat >"$root/DEBIAN/postinst" <<'SCRIPT'
#!/bin/sh
set -e
if [ "$1" = configure ] && [ -d /run/systemd/system ]; then
    systemd-tmpfiles --create rke2certd.conf >/dev/null 2>&1 || true
    systemctl daemon-reload >/dev/null 2>&1 || true
    # an upgrade restarts a running daemon on the new code; a fresh install starts nothing
    if [ -n "$2" ]; then
        systemctl try-restart rke2certd.service >/dev/null 2>&1 || true
    fi
fi
exit 0
SCRIPT
cat >"$root/DEBIAN/prerm" <<'SCRIPT'
#!/bin/sh
set -e
if [ "$1" = remove ] && [ -d /run/systemd/system ]; then
    systemctl stop rke2certd.service >/dev/null 2>&1 || true
fi
exit 0
SCRIPT
cat >"$root/DEBIAN/postrm" <<'SCRIPT'
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || true
fi
if [ "$1" = purge ]; then
    rm -rf /opt/rke2certd  # bytecode a manual run may have left; certificates are never touched
    rmdir /etc/rke2certd 2>/dev/null || true
fi
exit 0
SCRIPT
chmod 0755 "$root/DEBIAN/postinst" "$root/DEBIAN/prerm" "$root/DEBIAN/postrm"
(cd "$root" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z |
  xargs -0 md5sum >DEBIAN/md5sums)

mkdir -p "$outdir"
deb=$outdir/rke2certd_${version}_${arch}.deb
dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null
echo "$deb"
