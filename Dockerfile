# sdeseg runtime image for Ray clusters (KubeRay). GPU build by default.
FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu124
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled
RUN apt-get update && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3-pip \
        build-essential git && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --upgrade pip && pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
WORKDIR /opt/sdeseg
COPY pyproject.toml README.md ./
COPY sdeseg ./sdeseg
COPY data_prep ./data_prep
COPY tune ./tune
RUN pip install ".[dev]"
# Pre-build nothing at run time: DeepSpeed's CPU shm op is skipped by the runtime.
CMD ["sdeseg", "--help"]
