#!/usr/bin/env bash
# The README's set-up command: Debian packages the tests and the quickstart need, then .venv/ with pinned deps.
set -euo pipefail
cd "$(dirname "$0")/.."

DEB_PACKAGES=(dataset-fashion-mnist prometheus)
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
# constraints.txt pins every version (torch 2.14.1 / torchvision 0.29.1 come from the local wheel cache).
.venv/bin/pip install -q -c constraints.txt -e ".[cpu,dev]"
echo "set-up complete: activate with 'source .venv/bin/activate'"
