#!/usr/bin/env bash
# Lay out rke2certd's installed files under DESTROOT (shared by build-deb.sh and the RPM spec):
#   /opt/rke2certd/                       self-contained venv: rke2certd + its Python deps
#   /usr/bin/rke2certd                    -> /opt/rke2certd/bin/rke2certd
#   $UNITDIR/rke2certd.service            + rke2-server/rke2-agent .service.d drop-ins
#   $TMPFILESDIR/rke2certd.conf
#   /etc/rke2certd/config.yaml            from config.example.yaml (a conffile, mode 0600:
#                                         it may hold a token)
#   /usr/share/doc/rke2certd/             README.md, config.example.yaml, the Prometheus alert
#                                         rules (prometheus/) and Grafana dashboard (grafana/)
#
# A venv is not relocatable (absolute paths in its scripts, pyvenv.cfg, compiled .pyc), so it is
# built AT /opt/rke2certd: in a private mount namespace, /opt becomes an overlay whose upper
# layer is DESTROOT/opt (or DESTROOT/opt/rke2certd is bind-mounted over a real /opt/rke2certd of
# the build machine, which is hidden, never touched). Needs root, or unprivileged user
# namespaces (`unshare --map-root-user`).
#
# The venv runs on Debian's/the distro's /usr/bin/python3.X (resolved, so that a later change of
# the default python3 does not break it); never on a pyenv/venv Python of the build machine
# (under /root, hidden by ProtectHome=). Env: PYTHON, UNITDIR, TMPFILESDIR, PIP_ARGS.
set -euo pipefail
umask 022

destroot=${1:?usage: stage.sh DESTROOT}
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=$(readlink -f "${PYTHON:-/usr/bin/python3}")
unitdir=${UNITDIR:-/lib/systemd/system}
tmpfilesdir=${TMPFILESDIR:-/usr/lib/tmpfiles.d}
prefix=/opt/rke2certd

mkdir -p "$destroot"
destroot=$(cd "$destroot" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Build from a copy: pip's in-tree build would leave build/ and *.egg-info in the repo.
mkdir "$work/src"
cp "$repo/pyproject.toml" "$work/src/"
for f in README.md LICENSE; do [[ -f $repo/$f ]] && cp "$repo/$f" "$work/src/"; done
tar -C "$repo" --exclude=__pycache__ --exclude='*.pyc' -cf - rke2certd | tar -C "$work/src" -xf -

mkdir -p "$destroot/opt" "$destroot/.opt-work"
if [[ -e $destroot$prefix ]]; then
  echo "stage.sh: $destroot$prefix exists; use an empty DESTROOT" >&2
  exit 1
fi
if [[ $(id -u) -eq 0 ]]; then
  ns=(unshare --mount --propagation private)
else
  ns=(unshare --map-root-user --mount --propagation private)
fi
# shellcheck disable=SC2016  # expanded by the inner shell
"${ns[@]}" bash -euo pipefail -c '
  if [ -e "$3" ]; then
    # a real /opt/rke2certd here: cover just it
    mkdir "$1/rke2certd" && mount --bind "$1/rke2certd" "$3"
  else
    # the rest of /opt stays visible (pip config may point at wheels there); new files go to $1
    mount -t overlay overlay -o "lowerdir=/opt,upperdir=$1,workdir=$5" /opt
  fi
  "$2" -m venv "$3"
  "$3/bin/python" -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
    ${PIP_ARGS:-} "$4"
  # the package manager owns this venv: no pip in it to change it behind dpkg/rpm
  "$3/bin/python" -m pip uninstall --quiet --yes pip
  "$3/bin/python" -c "import rke2certd, cryptography, pydantic, structlog, sdnotify, watchdog"
' stage "$destroot/opt" "$python" "$prefix" "$work/src" "$destroot/.opt-work"
rm -rf "$destroot/.opt-work"

install -d -m 0755 "$destroot/usr/bin" "$destroot$unitdir" \
  "$destroot$unitdir/rke2-server.service.d" "$destroot$unitdir/rke2-agent.service.d" \
  "$destroot$tmpfilesdir" "$destroot/usr/share/doc/rke2certd" "$destroot/etc/rke2certd"
ln -s "$prefix/bin/rke2certd" "$destroot/usr/bin/rke2certd"
install -m 0644 "$repo/systemd/rke2certd.service" "$destroot$unitdir/"
for svc in rke2-server rke2-agent; do
  install -m 0644 "$repo/systemd/$svc.service.d/10-rke2certd.conf" \
    "$destroot$unitdir/$svc.service.d/10-rke2certd.conf"
done
install -m 0644 "$repo/systemd/rke2certd.tmpfiles" "$destroot$tmpfilesdir/rke2certd.conf"

config=$repo/config.example.yaml
if [[ ! -f $config ]]; then
  # another part of the project writes it; a placeholder here keeps the package buildable
  config=$work/config.example.yaml
  printf '# rke2certd configuration: every key is optional (see the documentation).\n' >"$config"
fi
install -m 0600 "$config" "$destroot/etc/rke2certd/config.yaml"
install -m 0644 "$config" "$destroot/usr/share/doc/rke2certd/config.example.yaml"
[[ -f $repo/README.md ]] && install -m 0644 "$repo/README.md" "$destroot/usr/share/doc/rke2certd/"
install -D -m 0644 "$repo/packaging/prometheus/rke2certd.rules.yml" \
  "$destroot/usr/share/doc/rke2certd/prometheus/rke2certd.rules.yml"
install -D -m 0644 "$repo/packaging/grafana/rke2certd.json" \
  "$destroot/usr/share/doc/rke2certd/grafana/rke2certd.json"
echo "staged rke2certd into $destroot (venv on $python)"
