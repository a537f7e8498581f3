#!/usr/bin/env bash
# Run kubetune's whole test suite: unit, integration (SQLite and PostgreSQL) and
# end-to-end tests on a real Kubernetes control plane. Installs what is missing
# first (see scripts/setup.sh). Extra arguments go to pytest.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
# shellcheck source=setup.sh
source "$repo/scripts/setup.sh"
# Missing binaries or servers must fail the run, never skip tests silently.
export KUBETUNE_E2E_REQUIRE=1
printf '\n==> pytest\n'
python3 -m pytest "$@"
