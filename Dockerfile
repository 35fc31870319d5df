# vlmserve: CPU image by default; the CUDA variant through build arguments:
#   docker build -t vlmserve .
#   docker build -t vlmserve:cuda --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#                --build-arg PIP_EXTRA_INDEX_URL=<a PyTorch CUDA wheel index> .
# The install and serve steps are the README's own, so what CI tests is what the image runs.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# An extra wheel index for torch (for example PyTorch's CPU-only index, which keeps the CPU image small).
ARG PIP_EXTRA_INDEX_URL=""
ENV PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL} \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    MALLOC_TRIM_THRESHOLD_=131072 \
    MALLOC_MMAP_THRESHOLD_=131072 \
    HF_HOME=/home/vlmserve/.cache/huggingface

# g++: torch.compile builds the compiled decode step's kernels with it (without one, the server decodes eagerly).
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ $(command -v python3 >/dev/null || echo python3 python3-venv) \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 vlmserve

WORKDIR /opt/vlmserve
COPY --chown=vlmserve:vlmserve . /opt/vlmserve/src

# README install step (a regular, non-editable install: the embedded default model travels as package data).
RUN python3 -m venv /opt/vlmserve/.venv \
    && . /opt/vlmserve/.venv/bin/activate \
    && pip install torch==2.13.0 ./src ./src/client \
    && rm -rf /opt/vlmserve/src
ENV PATH=/opt/vlmserve/.venv/bin:$PATH

USER vlmserve
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD python3 -c "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/ready', timeout=2).status != 200)"
# README serve step, listening on all interfaces inside the container.
CMD ["vlmserve", "serve", "--host", "0.0.0.0"]
