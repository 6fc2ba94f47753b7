# syntax=docker/dockerfile:1
# The gateway / modelsync image: `modelmux gateway` (default) or `modelmux sync`, no TensorFlow.
#
#   docker build -f deploy/docker/gateway.Dockerfile -t modelmux/gateway:0.1.0 .
#
# It installs the project without the backend extra, so without TensorFlow: the gateway carries
# its own definitions of TF Serving's messages. tests/test_gateway_install.py installs the files
# copied below the same way and checks that this list matches scripts/gateway_venv.py's.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway gateway
COPY modelsync modelsync
COPY modelmux_common modelmux_common
COPY clients/modelmux clients/modelmux
RUN python -m venv /opt/modelmux \
    && /opt/modelmux/bin/pip install --no-cache-dir . \
    && /opt/modelmux/bin/pip uninstall --yes pip setuptools

FROM ${PYTHON_IMAGE}
ENV PATH=/opt/modelmux/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MODELMUX_LOG_FORMAT=json \
    MODELMUX_PROBE_ADDRESS=127.0.0.1:8500
COPY --from=build /opt/modelmux /opt/modelmux
RUN groupadd --system --gid 10001 modelmux \
    && useradd --system --uid 10001 --gid modelmux --no-create-home --shell /usr/sbin/nologin modelmux
USER 10001:10001
WORKDIR /tmp
# The config sets the addresses (gateway.listen: 0.0.0.0:8500, modelsync.listen: 0.0.0.0:8510,
# or a unix: socket for a sidecar); an environment default here would override the file.
EXPOSE 8500 8510
# grpc.health.v1 overall status; a modelsync container sets MODELMUX_PROBE_ADDRESS=127.0.0.1:8510.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s \
    CMD ["python", "-m", "modelmux.client.probe", "--timeout", "3"]
ENTRYPOINT ["modelmux"]
CMD ["gateway", "--config", "/etc/modelmux/modelmux.yaml"]
