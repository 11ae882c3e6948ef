# syntax=docker/dockerfile:1
# The imagegen image: every Ray pod runs it (README § Deploying to Kubernetes).
#   docker build -t imagegen .                                   # CPU torch
#   docker build -t imagegen-gpu --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 \
#     --build-arg EXTRAS=safety,provenance,gpu .                 # CUDA torch + xformers
# Then deploy it by digest: imagegen render k8s --overlay prod --image REPO@sha256:...
#
# The base is pinned by content. Its digest was taken from a public record of the
# tag, not pulled here: check it (docker buildx imagetools inspect
# python:3.11-slim-bookworm) before the first build, and update it with the tag.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:2e32f7d302adc1c37428355c1e646897c0c53f4fd60b6a551245fb90ee129f91

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG EXTRAS=safety,provenance
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /app
COPY pyproject.toml README.md models.lock constraints.txt ./
COPY serve ./serve
COPY autoscaling ./autoscaling
COPY proto ./proto
# Versions from constraints.txt, the set the suite ran with; all dependencies come as
# wheels (neither stage has a compiler). torch first, from its own index: PyPI's is
# CUDA's; its own dependencies come with the project's, from PyPI (the torch index
# mirrors only some of their versions). The project is installed editable from /app, which the final stage keeps
# (models.lock, the policies and the style library are read from the checkout).
RUN python -m venv /opt/imagegen \
 && /opt/imagegen/bin/pip install --only-binary=:all: -c constraints.txt --no-deps \
      --index-url "${TORCH_INDEX}" torch \
 && /opt/imagegen/bin/pip install -c constraints.txt -e ".[${EXTRAS}]" \
 && /opt/imagegen/bin/pip install --only-binary=:all: -c constraints.txt --no-deps \
      invisible-watermark \
 && /opt/imagegen/bin/python -m compileall -q /app/serve /app/autoscaling

FROM ${PYTHON_IMAGE}
# wget: KubeRay's exec probes on Ray pods call it. Nothing else from apt.
RUN apt-get update \
 && apt-get install -y --no-install-recommends wget \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 1000 --gid 100 --no-create-home --home-dir /tmp ray
COPY --from=build /opt/imagegen /opt/imagegen
COPY --from=build /app /app
# On PATH even where a login shell resets it (KubeRay's ENABLE_LOGIN_SHELL)
RUN ln -s /opt/imagegen/bin/ray /opt/imagegen/bin/imagegen /usr/local/bin/
# The root filesystem is read-only on the cluster: caches and Ray's session under
# /tmp (an emptyDir); weights come from `imagegen models fetch` (an init container)
# and are served offline.
ENV PATH=/opt/imagegen/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 XDG_CACHE_HOME=/tmp/cache XDG_STATE_HOME=/tmp/state HOME=/tmp
WORKDIR /app
USER 1000:100
CMD ["imagegen", "serve", "--host", "0.0.0.0"]
