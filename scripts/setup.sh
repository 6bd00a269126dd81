#!/usr/bin/env bash
# The README's set-up command: Debian packages the tests and the quickstart need, then .venv/ with pinned deps.
set -euo pipefail
cd "$(dirname "$0")/.."

DEB_PACKAGES=(dataset-fashion-mnist prometheus openssl)
missing=()
for pkg in "${DEB_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
# torch's CUDA wheels (pip takes the CUDA build even on CPU machines) make .venv/ about 7 GB: say so up front
# rather than let pip die half-way with "No space left on device".
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  free_gb=$(df -P -BG . | awk 'NR == 2 {print int($4)}')
  if [ "${free_gb:-0}" -lt 8 ]; then
    echo "warning: ${free_gb} GB free on $(df -P . | awk 'NR == 2 {print $6}'); the set-up needs about 8 GB" >&2
  fi
fi
# constraints.txt pins every version (torch 2.14.1 / torchvision 0.29.1 come from the local wheel cache).
.venv/bin/pip install -q --no-cache-dir -c constraints.txt -e ".[cpu,dev]"
# The public reference implementation (facebookresearch/dinov2 as published on PyPI), for the parity tests and the
# reference baseline of bench/train_step.py. Its metadata pins torch 2.0 / xformers 0.0.18, so it goes, without its
# dependencies, into a directory of its own that only those tests and benchmarks put on sys.path.
[ -d .venv/reference/dinov2 ] ||
  .venv/bin/pip install -q --no-cache-dir --no-deps --target .venv/reference dinov2==0.0.1.dev2
# The real Kubernetes control plane of the cluster tests (etcd, kube-apiserver, controller manager, scheduler,
# kubectl), built from the Go module proxy into a cache outside the repository; seconds when already built.
bash scripts/k8s-stack.sh >/dev/null
echo "set-up complete: activate with 'source .venv/bin/activate'"
