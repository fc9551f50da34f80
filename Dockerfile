# One image for the API and the workers (`sdmerge serve` / `sdmerge worker`).
# GPU workers: build with --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 or similar.
FROM python:3.11-slim
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX=""
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /srv/sdmerge
RUN pip install ${TORCH_INDEX:+--index-url $TORCH_INDEX} "$TORCH_SPEC"
COPY pyproject.toml README.md ./
COPY merge_engine ./merge_engine
COPY app ./app
COPY worker ./worker
COPY migrations ./migrations
RUN pip install ".[service,preview]" && useradd --create-home --uid 1000 sdmerge \
    && mkdir -p /data /models && chown sdmerge /data
USER sdmerge
ENV SDMERGE_DATA_DIR=/data SDMERGE_MODEL_ROOTS=/models
EXPOSE 8000
CMD ["sdmerge", "serve", "--host", "0.0.0.0", "--port", "8000"]
