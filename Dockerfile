# thresher: select a subset of the images, then train a torchvision model on it.
#
#   docker build -t thresher .                                  online, from python:3.11-slim
#   docker build --build-arg BASE_IMAGE=thresher-base:bookworm \
#                --build-arg PIP_NO_INDEX=1 -t thresher .       offline, from wheelhouse/
#   docker build --build-arg TORCH_VARIANT=cpu -t thresher:cpu .   CPU-only torch (a fraction of the size)
#   docker build --build-arg EXTRAS=s3,gcs -t thresher .       with optional extras of pyproject.toml
#   docker build --build-arg EXTRAS=ray -t thresher .          with Ray: executor=ray, docker-compose.ray.yml
#   docker run --rm -v "$PWD/images:/data/input:ro" -v "$PWD/runs:/data/output" \
#       --user "$(id -u):$(id -g)" thresher data=folder sampler=random trainer.epochs=1
#
# Any base with CPython 3.11 and the venv module works (scripts/make-base-image.sh makes one
# from the Debian mirror). Offline, wheelhouse/ must hold every wheel, setuptools and wheel
# included (scripts/make-wheelhouse.sh fills it); online it may be empty.
ARG BASE_IMAGE=python:3.11-slim

# ---- deps: a virtualenv with the dependencies only ----------------------------------------------
FROM ${BASE_IMAGE} AS deps

# PIP_NO_INDEX=1: install from wheelhouse/ only, no network at all.
ARG PIP_NO_INDEX=0
# cuda: PyPI's torch, CUDA libraries included (runs on CPU too). cpu: the CPU-only build from
# TORCH_CPU_INDEX_URL (online) or from wheelhouse/ (offline: put its torch/torchvision +cpu wheels there).
ARG TORCH_VARIANT=cuda
ARG TORCH_CPU_INDEX_URL=https://download.pytorch.org/whl/cpu
# Optional extras of pyproject.toml installed too, comma-separated (e.g. s3,gcs).
ARG EXTRAS=""
ENV PIP_FIND_LINKS=/wheelhouse \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore

RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# Dependencies are read from pyproject.toml and installed before any code is copied, so editing
# the code does not reinstall torch. These stages are thrown away: the wheels never reach the image.
# The CPU variant installs torch and torchvision first, from the CPU index only, so that the other
# dependencies find them satisfied; the check at the end fails the build on the wrong torch.
COPY wheelhouse/ /wheelhouse/
COPY pyproject.toml scripts/image-requirements.py /src/
RUN python /src/image-requirements.py /src/pyproject.toml "$EXTRAS" > /tmp/requirements.txt \
 && if [ "$TORCH_VARIANT" = cpu ]; then \
        grep -E '^torch(vision)?[<>=!~ ;]' /tmp/requirements.txt > /tmp/torch.txt \
        && if [ "$PIP_NO_INDEX" = 1 ]; then pip install -r /tmp/torch.txt; \
           else env -u PIP_FIND_LINKS pip install --index-url "$TORCH_CPU_INDEX_URL" -r /tmp/torch.txt; fi; \
    fi \
 && pip install -r /tmp/requirements.txt \
 && python /src/image-requirements.py --check-torch "$TORCH_VARIANT"

# ---- build: thresher's own wheel ----------------------------------------------------------------
FROM deps AS build
ARG PIP_NO_INDEX=0

# README.m[d]: pyproject.toml names README.md as the long description; the glob keeps the COPY
# from failing where it is missing.
COPY pyproject.toml README.m[d] /src/
COPY conf/ /src/conf/
COPY app/ /src/app/
COPY hydra_plugins/ /src/hydra_plugins/
RUN pip wheel --no-deps --wheel-dir /dist /src

# ---- runtime ------------------------------------------------------------------------------------
FROM ${BASE_IMAGE}

# The repository URL, for the source label: --build-arg SOURCE_URL=...
ARG SOURCE_URL=""
ARG TORCH_VARIANT=cuda
ARG EXTRAS=""
LABEL org.opencontainers.image.title="thresher" \
      org.opencontainers.image.description="Select the grain from the chaff (coreset or random), then train a torchvision model on it; Hydra-composed." \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="0.1.0" \
      io.thresher.torch-variant="${TORCH_VARIANT}" \
      io.thresher.extras="${EXTRAS}"

# A fixed non-root user; the image also runs under any other UID (`--user "$(id -u):$(id -g)"`),
# so everything written outside /data/output goes to world-writable /tmp.
RUN groupadd --gid 1000 thresher \
 && useradd --uid 1000 --gid thresher --no-create-home --home-dir /tmp --shell /usr/sbin/nologin thresher \
 && mkdir -p /data/input /data/output /tmp/thresher-cache \
 && chmod 1777 /data/output /tmp/thresher-cache

# The dependencies (GBs, cached until pyproject.toml changes), then the small thresher wheel.
COPY --from=deps /opt/venv /opt/venv

# Matplotlib's font cache, built here once: without it every container builds it when it writes a
# report, and logs "generated new fontManager". Matplotlib uses its folder only if access(W_OK) says
# it may write there (else it warns and rebuilds in a temporary folder), so the folder is writable
# by any UID, sticky like /tmp; the cache file stays root's and read-only, and is only read.
ENV MPLCONFIGDIR=/opt/matplotlib
RUN mkdir -p "$MPLCONFIGDIR" \
 && /opt/venv/bin/python -c "import matplotlib.font_manager" \
 && chmod 1777 "$MPLCONFIGDIR" \
 && chmod a+r,go-w "$MPLCONFIGDIR"/*

COPY --from=build /dist/ /tmp/dist/
RUN /opt/venv/bin/pip install --no-deps --no-index --no-cache-dir --disable-pip-version-check \
        --root-user-action=ignore /tmp/dist/*.whl \
 && /opt/venv/bin/pip check --disable-pip-version-check \
 && /opt/venv/bin/python -c "import app.cli" \
 && rm -rf /tmp/dist

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    TORCH_HOME=/tmp/.cache/torch \
    THRESHER_INPUT_DIR=/data/input \
    THRESHER_WORK_DIR=/data/output \
    THRESHER_CACHE_DIR=/tmp/thresher-cache

USER thresher
WORKDIR /data/output

# Exec form: the Python process is PID 1 and gets `docker stop`'s SIGTERM itself (thresher handles
# it and exits 143); `docker run IMAGE key=value ...` hands the overrides straight to Hydra.
ENTRYPOINT ["thresher"]
CMD []
