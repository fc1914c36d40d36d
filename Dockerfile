# syntax=docker/dockerfile:1
# SecondSite's one image, two commands: `secondsite operator` (the default) and
# `secondsite appliance` (the pods the operator launches). manifests/ name it `secondsite:0.1.0`;
# build, tag and push it as manifests/README.md describes.
#
# The appliance's data path is Python (NBD server, journal, stream) and calls no external program,
# so the image carries no Debian packages beyond the base: tools such as qemu-img or nbdinfo belong
# in a debug container (`kubectl debug`), not in every appliance.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/secondsite
WORKDIR /src
# Every dependency has a wheel for Linux (x86-64 and arm64): no compiler is needed.
COPY pyproject.toml README.md ./
COPY secondsite ./secondsite
RUN /opt/secondsite/bin/pip install .

FROM ${PYTHON_IMAGE}
COPY --from=build /opt/secondsite /opt/secondsite
ENV PATH=/opt/secondsite/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# The operator runs as this user (numeric, so that Kubernetes can check runAsNonRoot); the
# appliance's pod runs as root for block devices (manifests/base/appliance-podtemplate.yaml).
RUN groupadd --system --gid 65532 secondsite \
    && useradd --system --uid 65532 --gid 65532 --home-dir /nonexistent --no-create-home \
       --shell /usr/sbin/nologin secondsite
USER 65532:65532
ENTRYPOINT ["secondsite"]
CMD ["operator"]
