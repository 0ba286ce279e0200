# The Ray image the kuberay backend runs (KAITEN_RAY_IMAGE): Ray at the version this project pins, with
# kaiten's serving app, tuning job and the GPU engines installed. Build from the repository root:
#   docker build -f deploy/images/ray.Dockerfile -t <registry>/kaiten-ray:0.1.0 .
# Not built in CI (no Docker engine there); the tests check what is rendered to run it.
ARG RAY_VERSION=2.60.0
FROM rayproject/ray:${RAY_VERSION}-py311-gpu
WORKDIR /opt/kaiten
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
RUN pip install --no-cache-dir ".[serving,tuning,gpu]"
# Ray runs the serving app (services.serving.app:build) and the tuning entrypoint from here
ENV PYTHONPATH=/opt/kaiten
