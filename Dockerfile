# sdeseg runtime image for Ray clusters (KubeRay): Linux x86_64, Python 3.11, CUDA build of torch.
#
#   docker build -t ghcr.io/sdeseg/sdeseg:0.1.0 .
#
# torch comes from the normal package index, whose Linux x86_64 wheel is the CUDA build (its CUDA
# 13 libraries arrive as nvidia-* wheels): the base image adds only what the NVIDIA container
# runtime needs to mount the host's driver (CUDA 13 wants driver >= 580). Every version comes from
# requirements/lock.txt, the pin list `make install` uses too; tests/test_image.py resolves this
# image's requirement set against it and checks the rules this file keeps.
FROM nvidia/cuda:13.0.2-base-ubuntu22.04

# Installed beside the runtime dependencies: the object-storage extras (s3://, gs:// URLs).
ARG SDESEG_EXTRAS=s3,gcs
ARG SDESEG_UID=1000

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# python3.11-dev and build-essential: Triton compiles a small C launcher against Python.h the
# first time each kernel runs. wget: KubeRay's default liveness/readiness probes call it.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3.11 python3.11-dev python3.11-venv build-essential ca-certificates wget \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv \
    && useradd --uid "${SDESEG_UID}" --user-group --create-home --shell /bin/bash sdeseg \
    && install -d -o sdeseg -g sdeseg /opt/sdeseg

WORKDIR /opt/sdeseg

# Dependency layer, before any source: rebuilt only when the pins or pyproject.toml change.
# tune/lock.py (stdlib only) lists pyproject's dependencies plus the extras above. The pins also
# reach the build environments of source-only packages (deepspeed) through --build-constraint.
COPY requirements/lock.txt requirements/lock.txt
COPY pyproject.toml pyproject.toml
COPY tune/lock.py tune/lock.py
RUN pip install -c requirements/lock.txt pip setuptools \
    && python tune/lock.py requirements "${SDESEG_EXTRAS}" > /tmp/image-requirements.txt \
    && pip install -c requirements/lock.txt --build-constraint requirements/lock.txt \
        -r /tmp/image-requirements.txt \
    && rm /tmp/image-requirements.txt

# The source, then sdeseg itself: its dependencies are all in the layer above.
COPY --chown=sdeseg:sdeseg README.md ./
COPY --chown=sdeseg:sdeseg sdeseg ./sdeseg
COPY --chown=sdeseg:sdeseg data_prep ./data_prep
COPY --chown=sdeseg:sdeseg tune ./tune
RUN pip install -c requirements/lock.txt --no-deps --no-build-isolation . \
    && rm -rf build sdeseg.egg-info

USER sdeseg
CMD ["sdeseg", "--help"]
