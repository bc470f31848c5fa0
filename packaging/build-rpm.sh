#!/usr/bin/env bash
# Build dist/rke2certd-<version>-1.<arch>.rpm from packaging/rke2certd.spec with rpmbuild
# (Debian's `rpm` package provides it). Same needs as build-deb.sh.
#   packaging/build-rpm.sh [OUTDIR]
set -euo pipefail
umask 022

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
outdir=${1:-$repo/dist}
python=$(readlink -f "${PYTHON:-/usr/bin/python3}")
version=$("$python" -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' \
  "$repo/pyproject.toml" | sed -E 's/\.?(dev|a|b|rc)([0-9]+)/~\1\2/')

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
rpmbuild -bb --quiet \
  --define "_topdir $work" \
  --define "srcdir $repo" \
  --define "pkg_version $version" \
  --define "python $python" \
  "$repo/packaging/rke2certd.spec" >&2

mkdir -p "$outdir"
for rpm in "$work"/RPMS/*/*.rpm; do
  cp "$rpm" "$outdir/"
  echo "$outdir/$(basename "$rpm")"
done
