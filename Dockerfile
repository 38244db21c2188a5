# The Credo signing server image the Helm chart (charts/credo) runs.
#   docker build -t credo:0.1.0 .
# The same image also carries credo-agent (ENTRYPOINT is credo-server; override it for the agent).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Non-root user; the chart's securityContext requires uid/gid 10001.
RUN groupadd --system --gid 10001 credo \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/credo \
        --no-create-home --shell /usr/sbin/nologin credo \
    && mkdir -p /var/lib/credo/server /run/credo-server /etc/credo \
    && chown -R 10001:10001 /var/lib/credo /run/credo-server

WORKDIR /src
COPY pyproject.toml README.md ./
COPY credo ./credo
COPY server ./server
COPY node_agent ./node_agent
RUN pip install --no-cache-dir . && rm -rf /src

WORKDIR /var/lib/credo
USER 10001:10001
# Agent endpoint (gRPC over TLS); metrics when enabled.
EXPOSE 8081 9988
ENTRYPOINT ["credo-server"]
CMD ["run", "--config", "/etc/credo/server.toml"]
