# One image for the API and the workers (`sdmerge serve` / `sdmerge worker`), in two flavours:
#   docker build --target cpu  -t sdmerge:cpu  .    # torch from the CPU wheel index (small)
#   docker build --target cuda -t sdmerge:cuda .    # torch from a CUDA wheel index, for GPU workers
# TORCH_INDEX_URL picks the wheel index at build time only (e.g. .../whl/cu124 or .../whl/cu128 to
# match the hosts' driver); the CUDA wheels bring their own CUDA runtime, so both build on the
# same slim Python base, and the NVIDIA container toolkit supplies the driver at run time.
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /srv/sdmerge
RUN useradd --create-home --uid 1000 sdmerge && mkdir -p /data /models && chown sdmerge /data

# The package as a wheel, with the native merge kernel (merge_engine/_kernels.c) compiled here, so
# the images carry no compiler; the import check fails the build if it did not compile, rather
# than shipping the slower path.
FROM base AS wheel
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml setup.py README.md ./
COPY merge_engine ./merge_engine
COPY app ./app
COPY worker ./worker
COPY migrations ./migrations
RUN pip wheel --no-deps --wheel-dir /wheels . \
    && python -m zipfile -l /wheels/sdmerge-*.whl | grep -q "merge_engine/_kernels" \
    || (echo "the native kernel did not compile" >&2 && exit 1)

FROM base AS torch-cpu
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --index-url "$TORCH_INDEX_URL" "$TORCH_SPEC"

FROM base AS torch-cuda
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124
RUN pip install --index-url "$TORCH_INDEX_URL" "$TORCH_SPEC"

FROM torch-cuda AS cuda
COPY --from=wheel /wheels /tmp/wheels
RUN pip install "$(ls /tmp/wheels/sdmerge-*.whl)[service,preview]" && rm -rf /tmp/wheels \
    && (cd / && python -c "import merge_engine._kernels")
USER sdmerge
# Workers of this image merge and sample on the GPU their container is given.
ENV SDMERGE_DATA_DIR=/data SDMERGE_MODEL_ROOTS=/models SDMERGE_LOG_FORMAT=json \
    SDMERGE_MERGE_DEVICE=cuda SDMERGE_PREVIEW_DEVICE=cuda \
    NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility
HEALTHCHECK --interval=30s --timeout=10s --retries=3 CMD ["sdmerge", "worker", "--check"]
CMD ["sdmerge", "worker", "--queues", "merge,preview"]

# Last, so a plain `docker build .` makes the CPU image.
FROM torch-cpu AS cpu
COPY --from=wheel /wheels /tmp/wheels
RUN pip install "$(ls /tmp/wheels/sdmerge-*.whl)[service,preview]" && rm -rf /tmp/wheels \
    && (cd / && python -c "import merge_engine._kernels")
USER sdmerge
ENV SDMERGE_DATA_DIR=/data SDMERGE_MODEL_ROOTS=/models SDMERGE_LOG_FORMAT=json
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --retries=5 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
CMD ["sdmerge", "serve", "--host", "0.0.0.0", "--port", "8000"]
