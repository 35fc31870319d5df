# vlmserve: CPU image by default; the CUDA variant through build arguments:
#   docker build -t vlmserve .
#   docker build -t vlmserve:cuda --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#                --build-arg PIP_EXTRA_INDEX_URL= .
# The install and serve steps are the README's own, so what CI tests is what the image runs. CI builds this file and
# proves the image serves (deploy/prove_image.py; README, "Docker").
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# An extra wheel index for torch, searched beside PyPI: PyTorch's CPU-only index by default, whose torch==2.13.0+cpu
# keeps the CPU image at 1.8 GB (PyPI's own Linux wheel is the CUDA build: 5.8 GB with its nvidia-* wheels). The
# CUDA variant passes an empty value (PyPI's CUDA build) or a PyTorch CUDA index.
ARG PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL} \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    MALLOC_TRIM_THRESHOLD_=131072 \
    MALLOC_MMAP_THRESHOLD_=131072 \
    HF_HOME=/home/vlmserve/.cache/huggingface

# g++ and Python's headers: torch.compile builds the compiled decode step's kernels and C++ wrapper with them (without
# them, the server decodes eagerly). A base without Python (the CUDA one) gets Debian's or Ubuntu's python3.
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
       $(command -v python3 >/dev/null || echo python3 python3-venv python3-dev) \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 vlmserve

WORKDIR /opt/vlmserve
# The virtual environment and torch first, in a layer of their own: a change to the source rebuilds only the layers
# below it (our dependencies, without torch's 1 GB: a minute less per build).
RUN python3 -m venv /opt/vlmserve/.venv && /opt/vlmserve/.venv/bin/pip install torch==2.13.0
COPY --chown=vlmserve:vlmserve . /opt/vlmserve/src

# README install step (a regular, non-editable install: the embedded default model travels as package data).
RUN . /opt/vlmserve/.venv/bin/activate \
    && pip install torch==2.13.0 ./src ./src/client \
    && rm -rf /opt/vlmserve/src
ENV PATH=/opt/vlmserve/.venv/bin:$PATH

USER vlmserve
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD python3 -c "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/ready', timeout=2).status != 200)"
# README serve step, listening on all interfaces inside the container.
CMD ["vlmserve", "serve", "--host", "0.0.0.0"]
