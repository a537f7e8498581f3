#!/usr/bin/env bash
# Install everything kubetune's tests and demos need on a fresh Debian machine:
# the Python package with its test extras, a PostgreSQL server (started), the
# Debian packages of the real node and the image builds (runc, iptables, ipset,
# buildah, mmdebstrap), the upstream Kubernetes binaries of the e2e cluster and
# kubetune's container images (built once, then cached).
# Idempotent: a second run takes seconds. Source it to keep the exported variables.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

step() { printf '\n==> %s\n' "$*"; }

step "Python packages (kubetune, tests, e2e)"
python3 -m pip install -q --disable-pip-version-check -e "$repo[test,e2e]" 2>&1 | grep -v "Running pip as the 'root' user" || true

step "PostgreSQL server"
# shellcheck source=../.ci/postgres.sh
source "$repo/.ci/postgres.sh"
export KUBETUNE_TEST_POSTGRES_URL

step "Debian packages: runc, iptables and ipset (the real node), buildah and mmdebstrap (images)"
missing=()
for pkg in runc iptables ipset buildah mmdebstrap; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
if (( ${#missing[@]} )); then
  echo "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get -qq update >/dev/null
  # With recommends: the same set the images were built and tested with.
  apt-get -qq install -y "${missing[@]}" >/dev/null
fi

step "Upstream Kubernetes binaries (cached under ${KUBETUNE_E2E_CACHE:-$HOME/.cache/kubetune-e2e})"
bash "$repo/e2e/cluster/build.sh"

step "Container images (scripts/images.sh; cached)"
bash "$repo/scripts/images.sh"
