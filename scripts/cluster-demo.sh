#!/usr/bin/env bash
# kubetune on a real Kubernetes cluster, end to end: build what is missing
# (Kubernetes, containerd, the kubetune images; cached), start a local cluster
# with a real node (upstream kubelet, containerd, runc; see e2e/README.md),
# install the Helm chart, run the ASHA example, show the result, tear down.
# Set KUBETUNE_DEMO_KEEP=1 to leave the cluster running afterwards.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
step() { printf '\n==> %s\n' "$*"; }

step "Setting up: Python packages, Debian packages, Kubernetes binaries, images (cached)"
# shellcheck source=setup.sh
source "$repo/scripts/setup.sh"

step "Starting the cluster"
eval "$(python3 -m e2e.cluster up)"
if [[ -z "${KUBETUNE_DEMO_KEEP:-}" ]]; then trap 'step "Stopping the cluster"; python3 -m e2e.cluster down' EXIT; fi
kubectl get nodes -o wide

step "helm install kubetune charts/kubetune"
# An emptyDir database: this cluster has no volume provisioner.
helm upgrade --install kubetune charts/kubetune --namespace kubetune-system --create-namespace \
  --set persistence.enabled=false --wait --timeout 5m
kubectl get pods -n kubetune-system

step "kubectl apply -f examples/asha.yaml"
kubectl apply -f examples/asha.yaml
# Progress while it runs: a row of the experiment's columns at every change.
kubectl get experiment synthetic-asha --watch &
watcher=$!
kubectl wait --for=condition=Succeeded experiment/synthetic-asha --timeout=10m
kill "$watcher" 2>/dev/null || true

step "Result"
kubectl get experiments
kubectl get trials --field-selector spec.experiment=synthetic-asha
best=$(kubectl get experiment synthetic-asha -o jsonpath='{.status.bestTrial.name}')
if [[ -n "$best" ]]; then
  pod=$(kubectl get trial "$best" -o jsonpath='{.status.podName}')
  step "kubectl logs $pod -c train   (the best trial's own output)"
  kubectl logs "$pod" -c train 2>/dev/null | tail -n 4 || echo "(its Pod is gone)"
fi
kubectl describe experiment synthetic-asha | sed -n '/^Events:/,$p'
