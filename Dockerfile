# push-relay container image.
#   docker build -t push-relay .
#   docker run --read-only -v ./relay.yaml:/etc/push-relay/relay.yaml:ro -p 50051:50051 push-relay
# The config must listen on 0.0.0.0 inside the container (server.listen: "0.0.0.0:50051") and
# serve plaintext health on 50052 (server.health_listen: "0.0.0.0:50052"): the HEALTHCHECK and
# Kubernetes' gRPC probes ask it, since the API port may require TLS.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/push-relay
COPY pyproject.toml constraints.txt README.md ./
COPY proto ./proto
COPY relay ./relay
COPY adapters ./adapters
# Bytecode is compiled here, at build time, with hash-based invalidation so it stays valid
# after COPY: at run time the service writes nothing, not even a .pyc.
RUN /opt/push-relay/bin/pip install --no-cache-dir -c constraints.txt . \
    && /opt/push-relay/bin/python -m compileall -q -f \
       --invalidation-mode unchecked-hash /opt/push-relay

FROM ${PYTHON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/push-relay/bin:$PATH
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin push-relay
COPY --from=build /opt/push-relay /opt/push-relay
COPY config/relay.example.yaml /etc/push-relay/relay.example.yaml
# Runs as a non-root user on a read-only root filesystem: nothing here needs to write.
USER 10001
EXPOSE 50051 50052 9464
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-m", "relay.healthcheck", "127.0.0.1:50052"]
# Exec form: push-relay itself is PID 1, so SIGTERM reaches Python directly and
# triggers the graceful shutdown.
ENTRYPOINT ["push-relay"]
CMD ["serve", "--config", "/etc/push-relay/relay.yaml"]
