# imagegw: slim, non-root. CPU torch by default; for a GPU image:
#   docker build --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#                --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t imagegw:cuda .
# Run with the policy folder mounted (edits to policy.yaml are validated and hot-reloaded) and a data volume:
#   docker run -p 8080:8080 -v "$PWD/config:/app/config" -v imagegw-data:/data -e IMAGEGW_ADMIN_KEY=... imagegw
ARG BASE_IMAGE=python:3.11.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH

# CUDA bases ship no Python; the slim base already has it (the distribution's own python3, whatever its patch).
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
      && rm -rf /var/lib/apt/lists/*; fi \
 && python3 -m venv /opt/venv \
 && pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"

WORKDIR /app
# Dependencies first, from pyproject.toml alone: this layer rebuilds only when they change, not with the code.
COPY pyproject.toml ./
RUN python3 -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['local'] + p['optional-dependencies']['report']))" \
    > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt

COPY README.md ./
COPY gateway ./gateway
COPY backends ./backends
COPY policies ./policies
COPY config ./config
RUN pip install --no-deps . \
 && useradd --system --uid 10001 --user-group --home-dir /app imagegw \
 && mkdir -p /data && chown 10001:10001 /data

USER 10001:10001
ENV IMAGEGW_DATA_DIR=/data IMAGEGW_SERVER__HOST=0.0.0.0
VOLUME ["/data"]
EXPOSE 8080
# Readiness on the configured port (IMAGEGW_SERVER__PORT or gateway.yaml), exec form: no shell needed.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s CMD ["imagegw", "healthcheck", "--config", "/app/config"]
CMD ["imagegw", "serve", "--config", "/app/config"]
