#!/usr/bin/env bash
# Build kubetune's container images with whatever this machine has, tag them
# with their release names and write each as a docker-archive tar (what
# `docker load` and `ctr images import` take; the e2e cluster imports them).
# The names have no registry host: kubetune/<image>:<version> (the chart's and
# the examples' default). containerd imports them under the name it gives a
# Pod's image "kubetune/<image>:<version>", so loaded onto a node they run as
# they are; for a cluster that pulls, tag and push them to your own registry
# and set the chart's image.registry to it.
#
#   bash scripts/images.sh                   # base, kubetune, trial-synthetic
#   bash scripts/images.sh --all             # and the pytorch-mlp CPU and GPU trials (huge)
#   bash scripts/images.sh --print-archives  # the archive paths, one a line; builds nothing
#
# The builder: `docker build` where a Docker engine answers (`docker info`),
# else `buildah bud --layers` (KUBETUNE_IMAGES_BUILDER=docker|buildah decides
# instead). The base image (every image is built FROM it, and it is tagged
# localhost/kubetune/python-base:<suite> for test Pods that run `python -c`):
#   1. --base IMAGE or KUBETUNE_BASE_IMAGE, when given ("mmdebstrap" asks for
#      the local one below);
#   2. with docker, the Dockerfile's public default (python:3.11-slim);
#   3. with buildah, the same when it is in local storage or can be pulled,
#      else a minimal Debian with python3 made by mmdebstrap from this host's
#      apt sources (no container registry needed). Its root filesystem tar is
#      cached under KUBETUNE_IMAGES_CACHE (default ~/.cache/kubetune-images),
#      keyed by the package list, so a warm run takes seconds.
#
# pip inside the builds uses the registry pip is configured for here: the CA
# bundle in PIP_CERT (or REQUESTS_CA_BUNDLE, SSL_CERT_FILE) and PIP_INDEX_URL,
# PIP_EXTRA_INDEX_URL, PIP_TRUSTED_HOST and a URL in PIP_FIND_LINKS reach the
# builds as build secrets, never as image layers. Where pip inside a build
# cannot reach an index, the kubetune image is built again from wheels pip
# downloads on this host into build/wheels (--host-wheels, or
# KUBETUNE_IMAGES_HOST_WHEELS=1, does that from the start).
#
# Archives go to KUBETUNE_IMAGES_OUT (default ~/.cache/kubetune-images/archives);
# one is rewritten only when its image changed. Build logs: <cache>/logs/.
set -euo pipefail

usage() {
    sed -n '2,/^set -euo pipefail/{/^set/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
    echo
    cat <<'EOF'
Options:
  --all               also build the pytorch-mlp trial images (CPU and GPU; gigabytes)
  --print-archives    print the archive paths of the selected images and exit
  --print-images      print the names of the selected images and exit (for `kind load`)
  --base IMAGE        the base image (KUBETUNE_BASE_IMAGE); "mmdebstrap": the local Debian one
  --builder NAME      docker or buildah (KUBETUNE_IMAGES_BUILDER)
  --host-wheels       install the kubetune image's Python packages from wheels
                      downloaded on this host (KUBETUNE_IMAGES_HOST_WHEELS=1)
  -h, --help          this help
EOF
}

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${KUBETUNE_IMAGES_CACHE:-$HOME/.cache/kubetune-images}
out=${KUBETUNE_IMAGES_OUT:-$HOME/.cache/kubetune-images/archives}
base_choice=${KUBETUNE_BASE_IMAGE:-}
builder=${KUBETUNE_IMAGES_BUILDER:-}
host_wheels=${KUBETUNE_IMAGES_HOST_WHEELS:-0}
all=0
print_archives=0
print_images=0

while (($#)); do
    case $1 in
        --all) all=1 ;;
        --print-archives) print_archives=1 ;;
        --print-images) print_images=1 ;;
        --base) base_choice=${2:?--base needs an image}; shift ;;
        --base=*) base_choice=${1#--base=} ;;
        --builder) builder=${2:?--builder needs docker or buildah}; shift ;;
        --builder=*) builder=${1#--builder=} ;;
        --host-wheels) host_wheels=1 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "images.sh: unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

# --- what gets built ------------------------------------------------------------------
# The release the images are tagged with: the chart's appVersion (its default image tag).
version=$(sed -n 's/^appVersion:[[:space:]]*"\{0,1\}\([^"]*\)"\{0,1\}[[:space:]]*$/\1/p' \
    "$repo/charts/kubetune/Chart.yaml")
[[ -n $version ]] || { echo "images.sh: no appVersion in charts/kubetune/Chart.yaml" >&2; exit 1; }
# Image names: <namespace>/<image>:<version>, without a registry host.
namespace=kubetune
# The local base: Debian's python3, nothing else. Pinned by the suite (the
# packages come from this host's apt sources); python3-venv gives the builds
# pip (ensurepip) without a system-wide pip; tini is left out, since every
# process kubetune runs handles SIGTERM itself and spawns no children to reap.
suite=bookworm
base_packages=(python3 python3-venv python-is-python3 ca-certificates)
local_base=localhost/kubetune/python-base:$suite
# The public default, kept in one place: the Dockerfile's ARG.
public_base=$(sed -n 's/^ARG BASE_IMAGE=//p' "$repo/Dockerfile" | head -n 1)

# name|tag|Dockerfile (relative to the repository; empty for the base)|archive file
images=(
    "base|$local_base||python-base-$suite.tar"
    "kubetune|$namespace/kubetune:$version|Dockerfile|kubetune-$version.tar"
    "trial-synthetic|$namespace/trial-synthetic:$version|trial-images/synthetic/Dockerfile|trial-synthetic-$version.tar"
)
if ((all)); then
    images+=(
        "trial-pytorch-mlp-cpu|$namespace/trial-pytorch-mlp:$version-cpu|trial-images/pytorch-mlp/Dockerfile.cpu|trial-pytorch-mlp-$version-cpu.tar"
        "trial-pytorch-mlp-gpu|$namespace/trial-pytorch-mlp:$version-gpu|trial-images/pytorch-mlp/Dockerfile.gpu|trial-pytorch-mlp-$version-gpu.tar"
    )
fi

if ((print_archives || print_images)); then
    for entry in "${images[@]}"; do
        IFS='|' read -r _ tag _ archive <<<"$entry"
        if ((print_images)); then echo "$tag"; else echo "$out/$archive"; fi
    done
    exit 0
fi

# --- progress -------------------------------------------------------------------------
started=$SECONDS
step() { printf '[%4ds] %s\n' "$((SECONDS - started))" "$*"; }
die() { printf 'images.sh: %s\n' "$*" >&2; exit 1; }
mkdir -p "$cache/logs" "$out"
# One run at a time per cache (a build and a cluster start may both call this).
if command -v flock >/dev/null; then
    exec 9>"$cache/.lock"
    flock 9
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# Run a command with its output in a log; on failure show the log's tail.
logged() {
    local log=$1
    shift
    if ! "$@" >"$log" 2>&1; then
        tail -n 40 "$log" >&2
        echo "images.sh: failed: $* (whole log: $log)" >&2
        return 1
    fi
}

# --- the builder ----------------------------------------------------------------------
if [[ -z $builder ]]; then
    if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
        builder=docker
    elif command -v buildah >/dev/null; then
        builder=buildah
    else
        die "neither a Docker engine (docker info) nor buildah found: install one"
    fi
fi
case $builder in
    docker) export DOCKER_BUILDKIT=1 ;;
    buildah) ;;
    *) die "unknown builder '$builder' (docker or buildah)" ;;
esac

image_exists() {
    if [[ $builder == docker ]]; then
        docker image inspect "$1" >/dev/null 2>&1
    else
        buildah inspect --type image "$1" >/dev/null 2>&1
    fi
}
image_id() {
    if [[ $builder == docker ]]; then
        docker image inspect --format '{{.Id}}' "$1"
    else
        buildah inspect --type image --format '{{.FromImageID}}' "$1"
    fi
}
image_label() {
    if [[ $builder == docker ]]; then
        docker image inspect --format "{{index .Config.Labels \"$2\"}}" "$1" 2>/dev/null || true
    else
        buildah inspect --type image --format "{{index .OCIv1.Config.Labels \"$2\"}}" "$1" \
            2>/dev/null || true
    fi
}
image_size() {
    local bytes
    if [[ $builder == docker ]]; then
        bytes=$(docker image inspect --format '{{.Size}}' "$1")
        echo "$((bytes / 1000000)) MB"
    else
        buildah images --format '{{.Size}}' "$1" | head -n 1
    fi
}
pull() {
    if [[ $builder == docker ]]; then
        timeout 600 docker pull -q "$1" >/dev/null 2>&1
    else
        timeout 600 buildah pull -q "$1" >/dev/null 2>&1
    fi
}
tag() {
    if [[ $builder == docker ]]; then docker tag "$1" "$2"; else buildah tag "$1" "$2"; fi
}

# --- the base -------------------------------------------------------------------------
# The mmdebstrap root filesystem, cached by everything that shapes it.
mmdebstrap_opts=(
    --variant=minbase
    # merged /usr by symlinks, as Debian's images have it (the usrmerge package
    # would pull in perl).
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr
    --dpkgopt='path-exclude=/usr/share/man/*'
    --dpkgopt='path-exclude=/usr/share/info/*'
    --dpkgopt='path-exclude=/usr/share/locale/*'
    --dpkgopt='path-exclude=/usr/share/lintian/*'
    --dpkgopt='path-exclude=/usr/share/doc/*'
    --dpkgopt='path-include=/usr/share/doc/*/copyright'
)
build_local_base() {
    command -v mmdebstrap >/dev/null || die "no base image: install mmdebstrap (or pass --base IMAGE)"
    local key tar label
    key=$(printf '%s\n' "$suite" "${base_packages[@]}" "${mmdebstrap_opts[@]}" |
        sha256sum | cut -c1-16)
    tar=$cache/base/python-base-$suite-$key.tar
    if [[ ! -s $tar ]]; then
        step "base: mmdebstrap $suite with ${base_packages[*]} (about a minute)"
        mkdir -p "$cache/base"
        rm -f "$cache/base/python-base-$suite-"*.tar
        logged "$cache/logs/mmdebstrap.log" mmdebstrap "${mmdebstrap_opts[@]}" \
            --include="$(IFS=,; echo "${base_packages[*]}")" "$suite" "$tmp/rootfs.tar"
        # The runtime mounts its own /dev: no device nodes in the image.
        tar --delete --wildcards -f "$tmp/rootfs.tar" './dev/?*'
        mv "$tmp/rootfs.tar" "$tar"
    fi
    if image_exists "$local_base" && [[ $(image_label "$local_base" io.kubetune.base-key) == "$key" ]]; then
        step "base: $local_base is up to date (cached root filesystem $key)"
        return
    fi
    step "base: importing the root filesystem as $local_base"
    local labels=(
        "org.opencontainers.image.title=kubetune-python-base"
        "org.opencontainers.image.description=Debian $suite (minbase) with ${base_packages[*]}"
        "io.kubetune.base-key=$key"
    )
    local path=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
    if [[ $builder == docker ]]; then
        local changes=(--change "ENV PATH=$path" --change "ENV LANG=C.UTF-8" --change 'CMD ["python3"]')
        for label in "${labels[@]}"; do changes+=(--change "LABEL ${label%%=*}=\"${label#*=}\""); done
        docker import "${changes[@]}" "$tar" "$local_base" >/dev/null
    else
        local ctr args=()
        ctr=$(buildah from scratch)
        buildah add --quiet "$ctr" "$tar" / >/dev/null
        for label in "${labels[@]}"; do args+=(--label "$label"); done
        buildah config --env "PATH=$path" --env LANG=C.UTF-8 --cmd python3 "${args[@]}" "$ctr"
        buildah commit --quiet --rm "$ctr" "$local_base" >/dev/null
    fi
}

base_started=$SECONDS
gpu_base=
if [[ $base_choice == mmdebstrap ]]; then
    base_choice=
    use_local_base=1
elif [[ -n $base_choice ]]; then
    use_local_base=0
elif [[ $builder == docker ]]; then
    base_choice=$public_base
    use_local_base=0
else
    # buildah: the public base where a registry is reachable, else the local one.
    step "base: looking for $public_base"
    if image_exists "$public_base" || pull "$public_base"; then
        base_choice=$public_base
        use_local_base=0
    else
        step "base: no registry reachable; using a local Debian base instead"
        use_local_base=1
    fi
fi
if ((use_local_base)); then
    build_local_base
    base=$local_base
    # The GPU trial then gets torch (with its CUDA libraries) from pip.
    gpu_base=$local_base
else
    base=$base_choice
    if ! image_exists "$base"; then
        step "base: pulling $base"
        pull "$base" || die "cannot pull $base"
    fi
    [[ $base == "$local_base" ]] || tag "$base" "$local_base"
    step "base: $base (tagged $local_base)"
fi
base_seconds=$((SECONDS - base_started))

# --- pip's settings for the builds, as build secrets --------------------------------
secrets=()
for cert in "${PIP_CERT:-}" "${REQUESTS_CA_BUNDLE:-}" "${SSL_CERT_FILE:-}"; do
    if [[ -n $cert && -f $cert && -r $cert ]]; then
        secrets+=(--secret "id=pip-cert,src=$cert")
        break
    fi
done
{
    echo "[global]"
    [[ -z ${PIP_INDEX_URL:-} ]] || echo "index-url = $PIP_INDEX_URL"
    [[ -z ${PIP_EXTRA_INDEX_URL:-} ]] || echo "extra-index-url = $PIP_EXTRA_INDEX_URL"
    [[ -z ${PIP_TRUSTED_HOST:-} ]] || echo "trusted-host = $PIP_TRUSTED_HOST"
    # A local directory here means nothing inside a build (--host-wheels uses it).
    case ${PIP_FIND_LINKS:-} in http://* | https://*) echo "find-links = $PIP_FIND_LINKS" ;; esac
} >"$tmp/pip.conf"
if [[ $(wc -l <"$tmp/pip.conf") -gt 1 ]]; then
    secrets+=(--secret "id=pip-conf,src=$tmp/pip.conf")
fi

# Wheels for the kubetune image, downloaded by this host's pip (its index,
# certificates and find-links) for the base's Python.
wheels_dir=build/wheels
download_wheels() {
    local pyver key stamp=$repo/$wheels_dir/.requirements
    if [[ $builder == docker ]]; then
        pyver=$(docker run --rm "$base" python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    else
        local ctr
        ctr=$(buildah from --pull=false "$base")
        pyver=$(buildah run "$ctr" -- python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
        buildah rm "$ctr" >/dev/null
    fi
    key=$(cat "$repo/requirements/build.txt" "$repo/requirements/runtime.txt" <(echo "$pyver") |
        sha256sum | cut -c1-16)
    if [[ -f $stamp && $(cat "$stamp") == "$key" ]]; then
        step "wheels: $wheels_dir is up to date (Python $pyver)"
        return
    fi
    step "wheels: downloading the pinned wheels for Python $pyver into $wheels_dir"
    rm -rf "${repo:?}/$wheels_dir"
    mkdir -p "$repo/$wheels_dir"
    logged "$cache/logs/wheels.log" python3 -m pip download --disable-pip-version-check \
        --only-binary=:all: --python-version "$pyver" -d "$repo/$wheels_dir" \
        -r "$repo/requirements/build.txt" -r "$repo/requirements/runtime.txt"
    echo "$key" >"$stamp"
}

revision=$(git -C "$repo" rev-parse HEAD 2>/dev/null || echo unknown)
# The commit's date, not the clock: an unchanged tree gives the same image.
created=$(git -C "$repo" log -1 --format=%cI 2>/dev/null || echo unknown)

build() {
    local name=$1 image=$2 dockerfile=$3 base_arg=$4 wheels=$5
    local args=(--build-arg "VERSION=$version" --build-arg "REVISION=$revision"
        --build-arg "CREATED=$created")
    [[ -z $base_arg ]] || args+=(--build-arg "BASE_IMAGE=$base_arg")
    [[ -z $wheels ]] || args+=(--build-arg "KUBETUNE_WHEELS=$wheels")
    if [[ $builder == docker ]]; then
        logged "$cache/logs/$name.log" docker build --progress=plain "${args[@]}" "${secrets[@]}" \
            -f "$repo/$dockerfile" -t "$image" "$repo"
    else
        logged "$cache/logs/$name.log" buildah bud --layers --pull=false --network host \
            "${args[@]}" "${secrets[@]}" -f "$repo/$dockerfile" -t "$image" "$repo"
    fi
}

# Write the image's archive unless the one there already holds this image
# under this name (the name is what the archive's importer tags it with).
archive() {
    local image=$1 path=$2 id
    id="$(image_id "$image") $image"
    if [[ -s $path && -f $path.id && $(cat "$path.id") == "$id" ]]; then
        return
    fi
    step "$image: writing $path"
    rm -f "$path.tmp" "$path.id"
    if [[ $builder == docker ]]; then
        docker save -o "$path.tmp" "$image"
    else
        buildah push --quiet "$image" "docker-archive:$path.tmp:$image" >/dev/null
    fi
    mv "$path.tmp" "$path"
    echo "$id" >"$path.id"
}

summary=()
for entry in "${images[@]}"; do
    IFS='|' read -r name image dockerfile archive_name <<<"$entry"
    t0=$SECONDS
    [[ -n $dockerfile ]] || t0=$((t0 - base_seconds))
    if [[ -n $dockerfile ]]; then
        base_arg=$base
        if [[ $name == trial-pytorch-mlp-gpu ]]; then
            # The Dockerfile's CUDA base where a registry is reachable.
            base_arg=${KUBETUNE_GPU_BASE_IMAGE:-$gpu_base}
        fi
        wheels=
        if [[ $name == kubetune && $host_wheels == 1 ]]; then
            download_wheels
            wheels=$wheels_dir
        fi
        step "$name: building $image ($builder${wheels:+, wheels from $wheels})"
        if ! build "$name" "$image" "$dockerfile" "$base_arg" "$wheels"; then
            [[ $name == kubetune && -z $wheels ]] || exit 1
            step "$name: the build failed; if pip could not reach an index, wheels from this host may do"
            download_wheels
            step "$name: building $image again ($builder, wheels from $wheels_dir)"
            build "$name" "$image" "$dockerfile" "$base_arg" "$wheels_dir" || exit 1
        fi
    fi
    archive "$image" "$out/$archive_name"
    summary+=("$(printf '%-48s %10s %5ds' "$image" "$(image_size "$image")" "$((SECONDS - t0))")")
done

step "done in $((SECONDS - started))s; archives in $out"
printf '%s\n' "${summary[@]}"
