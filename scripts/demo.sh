#!/usr/bin/env bash
# kubetune's main job in one command: tune the quickstart model on this machine
# with TPE and ASHA early stopping, showing live progress, then the best result.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
printf '==> Installing kubetune (Python package)\n'
python3 -m pip install -q --disable-pip-version-check -e "$repo" 2>&1 | grep -v "Running pip as the 'root' user" || true
printf '==> kubetune run examples/quickstart.yaml\n'
exec kubetune run examples/quickstart.yaml --dir "${KUBETUNE_DEMO_DIR:-$(mktemp -d /tmp/kubetune-demo.XXXXXX)}" "$@"
