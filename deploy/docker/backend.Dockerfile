# syntax=docker/dockerfile:1
# The embedded, TF-Serving-compatible backend (`modelmux backend`, TensorFlow in-process) for
# CPU nodes, development and tests. Production accelerators run the official tensorflow/serving
# (CPU / GPU) or AWS Neuron's TF Serving image instead, behind the same gateway.
#
#   docker build -f deploy/docker/backend.Dockerfile -t modelmux/backend:0.1.0 .
#
# The `backend` extra brings TensorFlow and tensorflow-serving-api.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY backend backend
COPY gateway gateway
COPY modelsync modelsync
COPY modelmux_common modelmux_common
COPY clients/modelmux clients/modelmux
RUN python -m venv /opt/modelmux \
    && /opt/modelmux/bin/pip install --no-cache-dir '.[backend]' \
    && /opt/modelmux/bin/pip uninstall --yes pip setuptools

FROM ${PYTHON_IMAGE}
ENV PATH=/opt/modelmux/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    MODELMUX_LOG_FORMAT=json \
    MODELMUX_PROBE_ADDRESS=127.0.0.1:9000
COPY --from=build /opt/modelmux /opt/modelmux
RUN groupadd --system --gid 10001 modelmux \
    && useradd --system --uid 10001 --gid modelmux --no-create-home --shell /usr/sbin/nologin modelmux
USER 10001:10001
WORKDIR /tmp
EXPOSE 9000
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s \
    CMD ["python", "-m", "modelmux.client.probe", "--timeout", "3"]
ENTRYPOINT ["modelmux"]
CMD ["backend", "--listen", "0.0.0.0:9000", "--accelerator", "cpu"]
