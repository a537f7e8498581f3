#!/usr/bin/env bash
# Build the pinned upstream binaries the e2e harness needs into a cache outside
# the repository:
#
#   ${KUBETUNE_E2E_CACHE:-$HOME/.cache/kubetune-e2e}/<k8s-version>/bin/
#     kube-apiserver kube-controller-manager kube-scheduler kubectl
#     kubelet kube-proxy                       (the real node)
#     containerd containerd-shim-runc-v2 ctr   (its container runtime)
#     cni/{bridge,host-local,loopback,portmap} (its pod network)
#     coredns                                  (cluster DNS)
#     gpu-plugin                               (fake nvidia.com/gpu devices:
#                                               gpu-plugin/main.go)
#     pause.tar                                (the sandbox image, built from
#                                               the Kubernetes sources)
#     etcd helm kwok
#     kube-router                              (NetworkPolicy enforcement only:
#                                               its firewall controller)
#
# Idempotent: a binary whose stamp file records the same version and build
# flags is skipped, and GOMODCACHE/GOCACHE are kept, so a warm run takes
# seconds. No binary is ever written into the repository.
#
# Why wrapper modules: `go install k8s.io/kubernetes/cmd/...@vX` is refused
# because the root go.mod of kubernetes replaces its ~33 staging modules with
# local paths. A tiny module that requires k8s.io/kubernetes and replaces each
# staging module with its published k8s.io/<name> v0.<minor>.<patch> twin
# builds the exact same code. etcd gets a wrapper too, because the etcd server
# module's go.mod also carries local replaces.
#
# Usage: e2e/cluster/build.sh [--print-bin-dir]
#   KUBETUNE_K8S_VERSION / _ETCD_ / _HELM_ / _KWOK_ / _KUBE_ROUTER_VERSION
#   override the pins;
#   KUBETUNE_BUILD_ONLY="etcd kubernetes" builds a subset;
#   GOMODCACHE and GOCACHE (go env) are where the real time is saved: keep
#   them, and the binary cache, between CI runs.
set -euo pipefail

K8S_VERSION="${KUBETUNE_K8S_VERSION:-v1.36.3}"
ETCD_VERSION="${KUBETUNE_ETCD_VERSION:-v3.6.16}"
HELM_VERSION="${KUBETUNE_HELM_VERSION:-v3.22.0}"
KWOK_VERSION="${KUBETUNE_KWOK_VERSION:-v0.8.0}"
CONTAINERD_VERSION="${KUBETUNE_CONTAINERD_VERSION:-v2.4.2}"
CNI_PLUGINS_VERSION="${KUBETUNE_CNI_PLUGINS_VERSION:-v1.10.0}"
COREDNS_VERSION="${KUBETUNE_COREDNS_VERSION:-v1.15.0}"
# v2.1.0 is the newest kube-router release the module proxy serves here
# (`go list -m -versions github.com/cloudnativelabs/kube-router/v2`).
KUBE_ROUTER_VERSION="${KUBETUNE_KUBE_ROUTER_VERSION:-v2.1.0}"

CACHE_ROOT="${KUBETUNE_E2E_CACHE:-$HOME/.cache/kubetune-e2e}"
CACHE="$CACHE_ROOT/$K8S_VERSION"
BIN="$CACHE/bin"
SRC="$CACHE/src"

if [[ "${1:-}" == "--print-bin-dir" ]]; then
  echo "$BIN"
  exit 0
fi

# The machine's toolchain must be used as is: an automatic toolchain download
# would hide a go-directive mismatch and needs network access we may not have.
export GOTOOLCHAIN="${GOTOOLCHAIN:-local}"
export GOFLAGS="${GOFLAGS:--buildvcs=false}"
export CGO_ENABLED="${CGO_ENABLED:-0}"

START=$(date +%s)
log() { echo "[build.sh +$(( $(date +%s) - START ))s] $*"; }

command -v go >/dev/null || { echo "build.sh: the Go toolchain is required" >&2; exit 2; }
mkdir -p "$BIN" "$SRC"
log "cache: $CACHE ($(go version))"

# stamp_ok NAME STAMP: true when bin/NAME exists and was built with STAMP.
stamp_ok() {
  [[ -x "$BIN/$1" && -f "$BIN/.$1.stamp" && "$(cat "$BIN/.$1.stamp")" == "$2" ]]
}
write_stamp() { printf '%s' "$2" > "$BIN/.$1.stamp"; }
# write_if_changed FILE < content: keep FILE's mtime when the content is the same.
write_if_changed() {
  local tmp; tmp=$(mktemp)
  cat > "$tmp"
  if [[ -f "$1" ]] && cmp -s "$tmp" "$1"; then rm -f "$tmp"; else mv "$tmp" "$1"; fi
}

# --- kube-apiserver, kube-controller-manager, kube-scheduler, kubectl -------
k8s_minor="${K8S_VERSION#v1.}"; k8s_minor="${k8s_minor%%.*}"
k8s_patch="${K8S_VERSION##*.}"
staging_version="v0.${k8s_minor}.${k8s_patch}"
K8S_CMDS=(kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy)

build_k8s() {
  local dir="$SRC/kubernetes"
  mkdir -p "$dir"
  local modfile commit build_date infofile
  local dl
  dl="$(go env GOMODCACHE)/cache/download/k8s.io/kubernetes/@v/$K8S_VERSION"
  if [[ ! -f "$dl.info" || ! -f "$dl.mod" ]]; then
    log "resolving k8s.io/kubernetes@$K8S_VERSION"
    (cd "$dir" && go mod download -json "k8s.io/kubernetes@$K8S_VERSION" >/dev/null)
  fi
  modfile="$dl.mod"
  infofile="$dl.info"
  # The release commit is recorded in .info's Origin when the module proxy
  # provides it; the release time is always there and keeps builds reproducible.
  commit=$(python3 -c 'import json,sys; print((json.load(open(sys.argv[1])).get("Origin") or {}).get("Hash",""))' "$infofile")
  build_date=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["Time"])' "$infofile")

  # Derive the staging list from the pinned root go.mod, never by hand.
  local replaces
  replaces=$(awk '/=> \.\/staging\/src\// {print "\t" $1 " => " $1 " '"$staging_version"'"}' "$modfile")
  [[ -n "$replaces" ]] || { echo "no staging replaces found in $modfile" >&2; return 1; }
  # go.mod is generated from this template (tidy then adds the indirect
  # requirements); regenerated only when the template changes, so a warm run
  # skips `go mod tidy`.
  write_if_changed "$dir/go.mod.template" <<EOF
module kubetune.local/e2e-k8s-wrapper

go 1.26.0

require k8s.io/kubernetes $K8S_VERSION

replace (
$replaces
)
EOF
  # tools.go pins the commands as dependencies so `go mod tidy` resolves
  # exactly what they import; the build tag keeps it out of any compilation.
  {
    echo '//go:build tools'
    echo
    echo 'package tools'
    echo
    echo 'import ('
    for c in "${K8S_CMDS[@]}"; do echo "	_ \"k8s.io/kubernetes/cmd/$c\""; done
    echo ')'
  } | write_if_changed "$dir/tools.go"
  if [[ ! -f "$dir/go.sum" || "$dir/go.mod.template" -nt "$dir/go.sum" || "$dir/tools.go" -nt "$dir/go.sum" ]]; then
    log "go mod tidy (downloads ~$(grep -c . <<<"$replaces") staging modules + dependencies)"
    cp "$dir/go.mod.template" "$dir/go.mod"
    (cd "$dir" && go mod tidy && touch go.sum)
  fi

  local pkg=k8s.io/component-base/version cpkg=k8s.io/client-go/pkg/version
  local x="" p
  # Both version packages are stamped, as hack/lib/version.sh does: servers
  # report component-base's, kubectl's client half reads client-go's.
  for p in $pkg $cpkg; do
    x+=" -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$k8s_minor"
    x+=" -X $p.gitCommit=$commit -X $p.gitTreeState=clean -X $p.buildDate=$build_date"
  done
  local ldflags="-s -w$x"
  local stamp="k8s $K8S_VERSION $ldflags"
  local todo=() c
  for c in "${K8S_CMDS[@]}"; do stamp_ok "$c" "$stamp" || todo+=("k8s.io/kubernetes/cmd/$c"); done
  if (( ${#todo[@]} == 0 )); then
    log "kubernetes $K8S_VERSION binaries up to date"
    return 0
  fi
  log "building ${todo[*]##*/} ... (one go build: shared compilation; cold on 2 cores takes long)"
  (cd "$dir" && go build -trimpath -ldflags "$ldflags" -o "$BIN/" "${todo[@]}")
  for c in "${K8S_CMDS[@]}"; do write_stamp "$c" "$stamp"; done
  log "built kubernetes $K8S_VERSION"
}

# --- etcd ------------------------------------------------------------------
build_etcd() {
  local dir="$SRC/etcd" stamp="etcd $ETCD_VERSION -s -w"
  if stamp_ok etcd "$stamp"; then log "etcd $ETCD_VERSION up to date"; return 0; fi
  mkdir -p "$dir"
  write_if_changed "$dir/go.mod.template" <<EOF
module kubetune.local/e2e-etcd-wrapper

go 1.26.0

require go.etcd.io/etcd/server/v3 $ETCD_VERSION
EOF
  # etcd's own main.go is exactly this call; its version string is a
  # constant of go.etcd.io/etcd/api/v3/version, so no ldflags are needed.
  write_if_changed "$dir/main.go" <<'EOF'
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
EOF
  if [[ ! -f "$dir/go.sum" || "$dir/go.mod.template" -nt "$dir/go.sum" ]]; then
    log "go mod tidy (etcd $ETCD_VERSION)"
    cp "$dir/go.mod.template" "$dir/go.mod"
    # Pin the sibling etcd modules to the same release: MVS would otherwise
    # keep whatever older versions the server module lists.
    (cd "$dir" && go mod tidy \
      && go get "go.etcd.io/etcd/api/v3@$ETCD_VERSION" "go.etcd.io/etcd/client/pkg/v3@$ETCD_VERSION" \
           "go.etcd.io/etcd/client/v3@$ETCD_VERSION" "go.etcd.io/etcd/pkg/v3@$ETCD_VERSION" \
      && go mod tidy && touch go.sum)
  fi
  log "building etcd $ETCD_VERSION ..."
  (cd "$dir" && go build -trimpath -ldflags "-s -w" -o "$BIN/etcd" .)
  write_stamp etcd "$stamp"
  log "built etcd"
}

# --- helm, kwok...: their go.mod files have no replaces, go install works --
go_install() {  # NAME PACKAGE@VERSION LDFLAGS [MORE PACKAGES@VERSION...]
  local name=$1 target=$2 ldflags=$3 stamp="$2 $3"
  shift 3
  if stamp_ok "$name" "$stamp"; then log "$name up to date"; return 0; fi
  log "building $name ($target $*) ..."
  GOBIN="${GOBIN_DIR:-$BIN}" go install -trimpath -ldflags "$ldflags" "$target" "$@"
  write_stamp "$name" "$stamp"
  log "built $name"
}

# The fake GPU device plugin: our own source, built against the kubelet's
# device-plugin API of the pinned release.
build_gpu_plugin() {
  local dir="$SRC/gpu-plugin" main stamp
  main="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/gpu-plugin/main.go"
  stamp="gpu-plugin $K8S_VERSION $(sha256sum "$main" | cut -c1-16)"
  if stamp_ok gpu-plugin "$stamp"; then log "gpu-plugin up to date"; return 0; fi
  mkdir -p "$dir"
  cp "$main" "$dir/main.go"
  printf 'module kubetune.local/e2e-gpu-plugin\n\ngo 1.26.0\n\nrequire k8s.io/kubelet %s\n' \
    "$staging_version" | write_if_changed "$dir/go.mod.template"
  if [[ ! -f "$dir/go.sum" || "$dir/go.mod.template" -nt "$dir/go.sum" ]]; then
    cp "$dir/go.mod.template" "$dir/go.mod"
    (cd "$dir" && go mod tidy && touch go.sum)
  fi
  (cd "$dir" && go build -trimpath -ldflags "-s -w" -o "$BIN/gpu-plugin" .)
  write_stamp gpu-plugin "$stamp"
  log "built gpu-plugin"
}

# The pause (sandbox) image: no registry is reachable, so it is compiled from
# build/pause/linux/pause.c of the pinned Kubernetes module and packed as a
# one-layer OCI image archive that `ctr images import` takes. A static binary
# and a hand-written manifest: no image builder needed. Named under localhost/,
# like the local python base of scripts/images.sh: a fully qualified name, so
# containerd stores it under exactly this name (the one node.py pins as the
# sandbox image) and never looks for it in a remote registry.
PAUSE_IMAGE="localhost/kubetune/pause:3.10-kubetune"
build_pause() {
  local stamp="pause $K8S_VERSION $PAUSE_IMAGE" src work
  if [[ -f "$BIN/pause.tar" && -f "$BIN/.pause.stamp" && "$(cat "$BIN/.pause.stamp")" == "$stamp" ]]; then
    log "pause image up to date"; return 0
  fi
  src="$(go env GOMODCACHE)/k8s.io/kubernetes@$K8S_VERSION/build/pause/linux/pause.c"
  [[ -f "$src" ]] || (cd "$SRC" && go mod download "k8s.io/kubernetes@$K8S_VERSION")
  command -v gcc >/dev/null || { echo "build.sh: gcc is needed for the pause image" >&2; return 1; }
  work=$(mktemp -d)
  mkdir -p "$work/rootfs"
  gcc -Os -static -Wall -DVERSION="\"$K8S_VERSION-kubetune\"" -o "$work/rootfs/pause" "$src"
  strip "$work/rootfs/pause" 2>/dev/null || true
  python3 "$(dirname "${BASH_SOURCE[0]}")/oci_archive.py" "$work/rootfs" "$PAUSE_IMAGE" /pause "$BIN/pause.tar"
  rm -rf "$work"
  write_stamp pause "$stamp"
  log "built the pause image ($PAUSE_IMAGE)"
}

# The standalone kwok binary has no built-in behaviour: it needs Stage
# objects. Use the release's own "fast" stages (nodes initialise and renew
# leases, pods become Ready, complete and are deleted at once).
kwok_stages() {
  local src out="$BIN/kwok-stages.yaml"
  src="$(go env GOMODCACHE)/sigs.k8s.io/kwok@$KWOK_VERSION/kustomize/stage"
  [[ -f "$out" ]] && return 0
  [[ -d "$src" ]] || (cd "$SRC" && go mod download "sigs.k8s.io/kwok@$KWOK_VERSION")
  local f first=1
  for f in node/fast/node-initialize.yaml node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
           pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml; do
    (( first )) || echo "---"
    first=0
    cat "$src/$f"
  done > "$out.tmp"
  mv "$out.tmp" "$out"
  log "wrote kwok stages: $out"
}

only="${KUBETUNE_BUILD_ONLY:-etcd kwok helm containerd cni coredns kubernetes pause gpu-plugin kube-router}"
for what in $only; do
  case $what in
    kubernetes) build_k8s ;;
    etcd) build_etcd ;;
    helm) go_install helm "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" \
            "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean" ;;
    # kwok's version is a constant in its source: no flags to stamp.
    kwok) go_install kwok "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION" "-s -w"
          kwok_stages ;;
    containerd)
      cpkg=github.com/containerd/containerd/v2
      go_install containerd "$cpkg/cmd/containerd@$CONTAINERD_VERSION" \
        "-s -w -X $cpkg/version.Version=$CONTAINERD_VERSION -X $cpkg/version.Package=$cpkg" \
        "$cpkg/cmd/containerd-shim-runc-v2@$CONTAINERD_VERSION" "$cpkg/cmd/ctr@$CONTAINERD_VERSION" ;;
    cni)
      mkdir -p "$BIN/cni"
      ppkg=github.com/containernetworking/plugins/plugins
      GOBIN_DIR="$BIN/cni" go_install cni "$ppkg/main/bridge@$CNI_PLUGINS_VERSION" "-s -w" \
        "$ppkg/ipam/host-local@$CNI_PLUGINS_VERSION" "$ppkg/main/loopback@$CNI_PLUGINS_VERSION" \
        "$ppkg/meta/portmap@$CNI_PLUGINS_VERSION" ;;
    coredns) go_install coredns "github.com/coredns/coredns@$COREDNS_VERSION" "-s -w" ;;
    # kube-router's go.mod has no replaces either. Only its firewall
    # (NetworkPolicy) controller runs: node.py starts it with the router and
    # the service proxy off, next to kube-proxy and the bridge CNI.
    kube-router)
      rpkg=github.com/cloudnativelabs/kube-router/v2
      go_install kube-router "$rpkg/cmd/kube-router@$KUBE_ROUTER_VERSION" \
        "-s -w -X $rpkg/pkg/version.Version=$KUBE_ROUTER_VERSION" ;;
    pause) build_pause ;;
    gpu-plugin) build_gpu_plugin ;;
    *) echo "unknown component $what" >&2; exit 2 ;;
  esac
done

cat > "$CACHE/versions.env" <<EOF
K8S_VERSION=$K8S_VERSION
ETCD_VERSION=$ETCD_VERSION
HELM_VERSION=$HELM_VERSION
KWOK_VERSION=$KWOK_VERSION
CONTAINERD_VERSION=$CONTAINERD_VERSION
CNI_PLUGINS_VERSION=$CNI_PLUGINS_VERSION
COREDNS_VERSION=$COREDNS_VERSION
KUBE_ROUTER_VERSION=$KUBE_ROUTER_VERSION
PAUSE_IMAGE=$PAUSE_IMAGE
EOF
log "done: $BIN"
ls -la "$BIN"
