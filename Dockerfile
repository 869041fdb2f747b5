# syntax=docker/dockerfile:1
# statefuld as a container: the daemon alone, configured by STATEFULD_* variables, serving on a
# Unix socket in the /run/statefuld volume that the application container shares.
#
#   docker build -t statefuld .
#   docker run -d --name statefuld -v statefuld-run:/run/statefuld \
#       -e STATEFULD_REDIS_URL=redis://redis:6379/0 -e STATEFULD_REDIS_PASSWORD statefuld
#
# The image does not bundle Redis: set STATEFULD_REDIS_URL (the embedded mode is for a laptop,
# not a container). Stopping drains for STATEFULD_DRAIN_TIMEOUT_S (3 s here: above the 2 s
# default request deadline), then takes up to 6 s more (server.STOP_AFTER_DRAIN_S: cancelled
# requests, last replies, closing Redis); 3 + 6 stays inside Docker's default 10 s stop grace
# period. Raise both together (docker run --stop-timeout, Kubernetes
# terminationGracePeriodSeconds). More: docs/DEPLOYMENT.md. tests/test_deploy_docker.py runs
# the RUN steps marked "mirrored" below outside Docker.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
# The wheels are built here, so that no build tool or source tree reaches the runtime image.
WORKDIR /src
COPY client_py/ client_py/
COPY sidecar/ sidecar/
COPY lua_scripts/ lua_scripts/
# mirrored: build the wheels of both packages and of every dependency
RUN pip wheel --no-cache-dir --disable-pip-version-check --wheel-dir /wheels ./client_py ./sidecar

FROM ${PYTHON_IMAGE}
# A fixed uid/gid, so Kubernetes runAsNonRoot can check it and the application container can
# share the socket through the group (fsGroup, docker run --group-add 10001). The socket
# directory is 0750: the daemon refuses a group- or world-writable one without the sticky bit.
RUN groupadd --system --gid 10001 statefuld \
    && useradd --system --uid 10001 --gid statefuld --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin statefuld \
    && install -d -o statefuld -g statefuld -m 0750 /run/statefuld
# mirrored: install only the wheels, offline
# Versions are pinned by the wheels built above (--no-index), not by the requirement.
# hadolint ignore=DL3013
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-cache-dir --disable-pip-version-check --no-index --find-links /wheels statefuld

ENV STATEFULD_SOCKET=/run/statefuld/statefuld.sock \
    STATEFULD_LOG_FORMAT=json \
    STATEFULD_DRAIN_TIMEOUT_S=3 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
VOLUME ["/run/statefuld"]
USER 10001:10001
STOPSIGNAL SIGTERM
# `statefuld health` exits 0 only when the daemon answers and Redis is reachable.
HEALTHCHECK --interval=10s --timeout=5s --start-period=15s --retries=3 \
    CMD ["statefuld", "health", "--timeout-s", "3"]
ENTRYPOINT ["statefuld", "serve"]
