# syntax=docker/dockerfile:1.7
# Controller image: the kopf operator reconciling DinoExperiment resources. Slim: no torch, no CUDA.
#
#   docker build -f docker/controller.Dockerfile -t registry.example.com/dino-ctl-controller:0.1.0 .
#
# The control plane's import path is torch-free (dino_ctl + trainer.config/metric_names/layout), so the project is
# installed without its dependencies and only the control plane's own are added, at the versions in constraints.txt.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY constraints.txt ./
RUN pip install -c constraints.txt kopf kubernetes pydantic PyYAML prometheus-client fsspec typer rich
COPY pyproject.toml README.md ./
COPY dino_ctl/ dino_ctl/
COPY trainer/ trainer/
COPY curation/ curation/
RUN pip install --no-deps . \
 && python -c "import sys, dino_ctl.controller.handlers; assert 'torch' not in sys.modules"

FROM ${PYTHON_IMAGE} AS controller
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
COPY --from=build /opt/venv /opt/venv
# Runs as a fixed non-root uid with a read-only root filesystem (see the chart's securityContext).
USER 65532:65532
# 8080: kopf health endpoint (/healthz, liveness and readiness); 9090: controller /metrics.
EXPOSE 8080 9090
ENTRYPOINT ["python", "-m", "dino_ctl.controller"]
