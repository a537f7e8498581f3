# syntax=docker/dockerfile:1
#
# The kubetune image: the operator (`python -m kubetune_controller`), the
# suggestion service (`python -m kubetune_suggestion.service`), the metrics
# collector sidecar (`python -m kubetune_suggestion.collector`) and the
# `kubetune` CLI all run from it (charts/kubetune sets each one's command).
#
#   docker build -t kubetune/kubetune:0.1.0 .
#
# scripts/images.sh builds it (and the trial images) with docker or buildah,
# on machines without a container registry from a locally built base.
#
# Build arguments:
#   BASE_IMAGE       any Debian-like image with python3 (3.11+) and its venv
#                    module; the builder and the final stage both use it, so
#                    the virtual environment's interpreter is the same.
#   VERSION, REVISION, CREATED   OCI labels (release, git commit, build date).
#   KUBETUNE_WHEELS  a directory of the build context holding every wheel
#                    (scripts/images.sh --host-wheels fills build/wheels):
#                    pip then installs from it without an index.
# Build secrets (optional; nothing of them stays in any layer):
#   pip-cert         a CA bundle for pip (a TLS-intercepting proxy).
#   pip-conf         a pip configuration file (index URLs and the like).

ARG BASE_IMAGE=python:3.11.14-slim-bookworm

# --- builder: a virtual environment with kubetune and its pinned dependencies ---
FROM ${BASE_IMAGE} AS builder

ARG KUBETUNE_WHEELS=
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PIP_NO_INPUT=1

RUN python3 -m venv /opt/kubetune

# The dependencies first, in their own layer: a change to the source reuses it.
COPY requirements/build.txt requirements/runtime.txt /src/requirements/
RUN --mount=type=secret,id=pip-cert --mount=type=secret,id=pip-conf \
    --mount=type=bind,target=/context \
    set -eu; \
    if [ -s /run/secrets/pip-cert ]; then export PIP_CERT=/run/secrets/pip-cert; fi; \
    if [ -s /run/secrets/pip-conf ]; then export PIP_CONFIG_FILE=/run/secrets/pip-conf; fi; \
    if [ -n "${KUBETUNE_WHEELS}" ]; then \
        set -- --no-index --find-links "/context/${KUBETUNE_WHEELS}"; \
    fi; \
    /opt/kubetune/bin/python -m pip install "$@" -r /src/requirements/build.txt; \
    /opt/kubetune/bin/python -m pip install "$@" --only-binary=:all: \
        -r /src/requirements/runtime.txt

COPY pyproject.toml README.md /src/
COPY sdk /src/sdk
COPY suggestion /src/suggestion
COPY operator /src/operator
COPY trial-images/synthetic/kubetune_trials /src/trial-images/synthetic/kubetune_trials
# The project itself, its dependencies held to the pins (a dependency missing
# from requirements/runtime.txt fails here, or is fetched and shows in the
# log); then the build tools and numpy's and scipy's own test suites (50 MB)
# leave the environment.
RUN --mount=type=secret,id=pip-cert --mount=type=secret,id=pip-conf \
    --mount=type=bind,target=/context \
    set -eu; \
    if [ -s /run/secrets/pip-cert ]; then export PIP_CERT=/run/secrets/pip-cert; fi; \
    if [ -s /run/secrets/pip-conf ]; then export PIP_CONFIG_FILE=/run/secrets/pip-conf; fi; \
    if [ -n "${KUBETUNE_WHEELS}" ]; then \
        set -- --no-index --find-links "/context/${KUBETUNE_WHEELS}"; \
    fi; \
    cd /src; \
    /opt/kubetune/bin/python -m pip install "$@" --no-build-isolation \
        -c requirements/runtime.txt .; \
    /opt/kubetune/bin/python -m pip check; \
    /opt/kubetune/bin/python -m pip uninstall -y -q setuptools wheel pip; \
    find /opt/kubetune/lib/python3*/site-packages/numpy /opt/kubetune/lib/python3*/site-packages/scipy \
        -depth -type d -name tests -exec rm -rf {} +; \
    /opt/kubetune/bin/python -c 'import kubetune, kubetune_controller, kubetune_suggestion, kubetune_trials'

# --- the image: the base and the virtual environment, nothing else ---
FROM ${BASE_IMAGE}

# Unbuffered logs; no bytecode writes (the root filesystem is read-only in the
# chart; pip compiled everything in the builder). HOME is /tmp, the one
# writable directory the chart mounts, for anything that wants a home.
# LOGNAME: kopf names the operator after getpass.getuser(), which otherwise
# fails for a uid without a passwd entry (any runAsUser a cluster picks).
ENV PATH=/opt/kubetune/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    VIRTUAL_ENV=/opt/kubetune \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    LOGNAME=kubetune

# The user the image runs as, named (for `id`, `ps` and libraries that look it up).
RUN grep -q '^[^:]*:[^:]*:65532:' /etc/passwd \
    || { echo 'kubetune:x:65532:65532:kubetune:/tmp:/usr/sbin/nologin' >>/etc/passwd \
         && echo 'kubetune:x:65532:' >>/etc/group; }

COPY --from=builder /opt/kubetune /opt/kubetune

# Last: a new commit (REVISION) only changes this metadata-only step.
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="kubetune" \
      org.opencontainers.image.description="kubetune: the operator, the suggestion service and the metrics collector for hyperparameter tuning on Kubernetes" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.source="https://github.com/kubetune/kubetune" \
      org.opencontainers.image.url="https://github.com/kubetune/kubetune" \
      org.opencontainers.image.licenses="Apache-2.0"

# Non-root and numeric (so runAsNonRoot can verify it); the chart runs every
# component as 65532 too, and any other uid works as well.
USER 65532:65532
CMD ["python", "-m", "kubetune_controller"]
