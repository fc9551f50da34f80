# One image for the API and the workers (`sdmerge serve` / `sdmerge worker`).
# GPU workers: build with --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 or similar.
FROM python:3.11-slim
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX=""
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /srv/sdmerge
RUN pip install ${TORCH_INDEX:+--index-url $TORCH_INDEX} "$TORCH_SPEC"
COPY pyproject.toml setup.py README.md ./
COPY merge_engine ./merge_engine
COPY app ./app
COPY worker ./worker
COPY migrations ./migrations
# A C compiler only while installing: it builds the native merge kernel (merge_engine/_kernels.c);
# the import check fails the build if it did not compile, rather than shipping the slower path.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && pip install ".[service,preview]" && (cd / && python -c "import merge_engine._kernels") \
    && apt-get purge -y gcc libc6-dev && apt-get autoremove -y && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1000 sdmerge && mkdir -p /data /models && chown sdmerge /data
USER sdmerge
ENV SDMERGE_DATA_DIR=/data SDMERGE_MODEL_ROOTS=/models
EXPOSE 8000
CMD ["sdmerge", "serve", "--host", "0.0.0.0", "--port", "8000"]
