#!/usr/bin/env bash
# kubetune on a real Kubernetes control plane, end to end: start the local
# control plane (upstream binaries + the process kubelet, see e2e/README.md),
# install the Helm chart, run the ASHA example, show the result, tear down.
# Set KUBETUNE_DEMO_KEEP=1 to leave the cluster running afterwards.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
step() { printf '\n==> %s\n' "$*"; }

step "Installing kubetune and building the upstream Kubernetes binaries (cached)"
python3 -m pip install -q --disable-pip-version-check -e "$repo[e2e]" 2>&1 | grep -v "Running pip as the 'root' user" || true
bash e2e/cluster/build.sh >/dev/null

step "Starting the control plane"
eval "$(python3 -m e2e.cluster up)"
if [[ -z "${KUBETUNE_DEMO_KEEP:-}" ]]; then trap 'step "Stopping the control plane"; python3 -m e2e.cluster down' EXIT; fi
kubectl get nodes

step "helm install kubetune charts/kubetune"
# An emptyDir database: this control plane has no volume provisioner.
helm upgrade --install kubetune charts/kubetune --namespace kubetune-system --create-namespace \
  --set persistence.enabled=false --wait --timeout 5m
kubectl get pods -n kubetune-system

step "kubectl apply -f examples/asha.yaml"
kubectl apply -f examples/asha.yaml
kubectl wait --for=condition=Succeeded experiment/synthetic-asha --timeout=10m

step "Result"
kubectl get experiments
kubectl get trials --field-selector spec.experiment=synthetic-asha
kubectl describe experiment synthetic-asha | sed -n '/^Events:/,$p'
