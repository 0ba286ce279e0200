# Kaiten's control-plane services (watcher, planner, provisioner, workload) and the kaiten CLI: light,
# no torch, no Ray. Build from the repository root:
#   docker build -f deploy/images/services.Dockerfile -t <registry>/kaiten-services:0.1.0 .
# Run one service per container: `python -m services.<name>` (the chart sets the command).
FROM python:3.11-slim-bookworm

# Where pip finds packages (a mirror, its CA): build arguments, not kept in the image.
ARG PIP_INDEX_URL
ARG PIP_CERT
ENV PATH=/opt/kaiten/venv/bin:$PATH \
    PYTHONPATH=/opt/kaiten \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN python3 -m venv /opt/kaiten/venv

# Dependencies first, from the lock (exact versions, hash-checked): a code change does not rebuild them.
COPY requirements/services.lock /opt/kaiten/services.lock
RUN pip install --no-cache-dir --disable-pip-version-check --require-hashes --no-deps \
        -r /opt/kaiten/services.lock

# Then the code, run from the source tree (PYTHONPATH): rebuilding it takes seconds.
WORKDIR /opt/kaiten
COPY shared ./shared
COPY services ./services

# Not root: the services need no privilege in the container.
USER 65532:65532
ENTRYPOINT ["python", "-m"]
CMD ["services.planner", "--help"]
