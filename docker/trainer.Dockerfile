# syntax=docker/dockerfile:1.7
# Trainer image: torchrun + trainer/ + curation/ + dino_ctl/ on a CUDA runtime.
#
#   docker build -f docker/trainer.Dockerfile -t registry.example.com/dino-ctl-trainer:0.1.0 .
#
# The base image's torch must equal the pin in constraints.txt (torch==2.14.1 built for CUDA 13), so that pip keeps it
# instead of pulling a second copy. Pods run it as `torchrun ... -m trainer.train --config /etc/dino-ctl/stage.yaml`
# (the renderers set the command); this image only provides the environment.
ARG BASE_IMAGE=pytorch/pytorch:2.14.1-cuda13.0-cudnn9-runtime

FROM ${BASE_IMAGE} AS trainer

# Inductor and Triton caches go to /tmp, writable also when the pod mounts an emptyDir there.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    TORCHINDUCTOR_CACHE_DIR=/tmp/torchinductor \
    TRITON_CACHE_DIR=/tmp/triton \
    HOME=/home/dino

WORKDIR /opt/dino-ctl

# Dependencies first, from the metadata and pins only, so their (large) layer survives source edits: empty packages
# stand in for the sources, then the placeholder distribution is removed again.
COPY pyproject.toml constraints.txt README.md ./
# faiss-gpu replaces faiss-cpu (same module, never both): install the GPU extra, not the CPU one. It includes the
# `storage` extra (s3fs for s3:// and S3-compatible endpoints, gcsfs for gs://): checkpoints, data and exports live
# on object stores in every cluster example.
RUN mkdir -p dino_ctl trainer curation \
 && touch dino_ctl/__init__.py trainer/__init__.py curation/__init__.py \
 && pip install -c constraints.txt ".[gpu]" \
 && pip uninstall -y dino-ctl \
 && rm -rf dino_ctl trainer curation build *.egg-info

COPY dino_ctl/ dino_ctl/
COPY trainer/ trainer/
COPY curation/ curation/
RUN pip install --no-deps -c constraints.txt . \
 && python -c "import trainer.metric_names, dino_ctl.spec, s3fs, gcsfs, fsspec; fsspec.filesystem('s3')"

# A fixed non-root uid: the pod's securityContext (runAsNonRoot) can check it.
RUN groupadd --gid 1000 dino \
 && useradd --uid 1000 --gid 1000 --create-home --home-dir /home/dino dino
USER 1000:1000
WORKDIR /workspace

# 9400: Prometheus /metrics (port name "metrics"); 29400: torchrun c10d rendezvous.
EXPOSE 9400 29400
CMD ["python", "-m", "trainer.train", "--help"]
