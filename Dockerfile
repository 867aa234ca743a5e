# wantel in a container: `wantel demo` by default (tiny offline Wan jobs, no GPU, no download);
# with the [nats] extra, the same image ships (`wantel ship`) and aggregates (`serve --nats`).
# The CPU wheel of torch is installed first so pip never pulls a multi-GB CUDA build; for a GPU
# image start from an nvidia/cuda base and drop the index URL.
FROM python:3.11.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    OMP_NUM_THREADS=1

WORKDIR /opt/wantel
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

COPY pyproject.toml setup.py README.md ./
COPY wantel ./wantel
COPY telemetry ./telemetry
COPY inference ./inference
COPY exporters ./exporters
COPY dashboards ./dashboards
# gcc and zlib's headers build the C accelerators (setup.py) and leave in the same layer.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev zlib1g-dev \
    && pip install '.[wan,nats]' \
    && apt-get purge -y --auto-remove gcc libc6-dev zlib1g-dev && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 wantel \
    && mkdir -p /var/lib/wantel && chown wantel /var/lib/wantel

USER wantel
ENV WANTEL_LOG=/var/lib/wantel/log
EXPOSE 9464
# Bind every interface inside the container; compose publishes the port on 127.0.0.1 only.
CMD ["wantel", "demo", "--host", "0.0.0.0", "--port", "9464"]
