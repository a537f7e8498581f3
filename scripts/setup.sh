#!/usr/bin/env bash
# Install everything kubetune's tests and demos need on a fresh Debian machine:
# the Python package with its test extras, a PostgreSQL server (started), and the
# upstream Kubernetes binaries for the e2e control plane (built once, then cached).
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

step "Upstream Kubernetes binaries (cached under ${KUBETUNE_E2E_CACHE:-$HOME/.cache/kubetune-e2e})"
bash "$repo/e2e/cluster/build.sh"
