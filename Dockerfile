# The Credo image the Helm chart (charts/credo) runs: credo-server, credo-agent and the CLIs.
#   docker build -t credo:0.1.0 .
#   docker build --build-arg BASE_IMAGE=<any Debian-like image with python3.11 and venv> ...
# Offline: put the wheels of every dependency (and setuptools) in ./wheels and the build
# installs from there instead of the package index (scripts/test-image does this).
#
# Users (the chart's securityContexts use these uids):
#   credo        10001  credo-server (and the helm test pod)
#   credo-agent  10002  credo-agent. Its own uid: with hostPID a process may signal every host
#                       process of its uid, so the agent shares it with nothing else.
# The agent needs no root and no capability. It needs what the chart gives it: the host PID
# namespace (to see the pids of workloads in other pods), and a socket directory it owns (the
# chart's init container chowns the host directory; the agent refuses one it or root does not own).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PATH=/opt/credo/bin:$PATH

RUN groupadd --system --gid 10001 credo \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/credo \
        --no-create-home --shell /usr/sbin/nologin credo \
    && groupadd --system --gid 10002 credo-agent \
    && useradd --system --uid 10002 --gid 10002 --home-dir /var/lib/credo-agent \
        --no-create-home --shell /usr/sbin/nologin credo-agent \
    && mkdir -p /var/lib/credo /var/lib/credo-agent /run/credo-server /run/credo-agent /etc/credo \
    && chown 10001:10001 /var/lib/credo /run/credo-server \
    && chown 10002:10002 /var/lib/credo-agent

# .dockerignore keeps everything but the package sources (and ./wheels) out of the context.
COPY . /src
RUN python3 -m venv /opt/credo \
    && if [ -d /src/wheels ]; then \
        /opt/credo/bin/pip install --no-index --find-links /src/wheels /src; \
    else \
        /opt/credo/bin/pip install /src; \
    fi \
    && rm -rf /src \
    && credo-server --help >/dev/null && credo-agent --help >/dev/null

WORKDIR /var/lib/credo
USER 10001:10001
# Agent endpoint (gRPC over TLS); metrics when enabled.
EXPOSE 8081 9988
ENTRYPOINT ["credo-server"]
CMD ["run", "--config", "/etc/credo/server.toml"]
