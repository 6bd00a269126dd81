#!/usr/bin/env bash
# Builds the real Kubernetes control plane the cluster tests run against, from the Go module proxy:
# etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kubectl of one pinned release
# (tests/k8s/go.mod pins k8s.io/kubernetes and every staging module to the matching v0.x), then kwok (fake nodes)
# and the Kubeflow training-operator (PyTorchJob controller) at pinned versions, and the upstream CRDs.
#
# Binaries go to a cache outside the repository keyed by version ($DINO_CTL_K8S_CACHE, default
# ~/.cache/dino-ctl/k8s); a warm run finds them there and returns in seconds. A piece that cannot be built is
# named with go's error and the script exits non-zero: nothing is skipped silently.
#
#   bash scripts/k8s-stack.sh            # build what is missing, print the bin directory
#   bash scripts/k8s-stack.sh --print    # print the bin directory only (no build)
set -euo pipefail
cd "$(dirname "$0")/.."

MODULE_DIR=tests/k8s
K8S_VERSION=$(awk '$1 == "k8s.io/kubernetes" && $2 ~ /^v/ {print $2; exit}' "$MODULE_DIR/go.mod")
ETCD_VERSION=$(awk '$1 == "go.etcd.io/etcd/server/v3" {print $2; exit}' "$MODULE_DIR/go.mod")
CACHE_ROOT=${DINO_CTL_K8S_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dino-ctl/k8s}
# The key includes go.sum's hash: a changed pin never reuses binaries built from other sources.
KEY="${K8S_VERSION}-etcd-${ETCD_VERSION}-$(sha256sum "$MODULE_DIR/go.sum" | cut -c1-12)"
BIN_DIR="$CACHE_ROOT/$KEY/bin"

# Upstream CRDs the cluster tests install, from the same Go module proxy (module@version path-in-module...).
# Volcano and JobSet are not served there: their CRDs come from ../shared/k8s-schemas when it exists.
CRD_SOURCES=(
  "github.com/kubeflow/training-operator@v1.9.3 manifests/base/crds/kubeflow.org_pytorchjobs.yaml"
  "github.com/kubeflow/trainer/v2@v2.2.0 manifests/base/crds/trainer.kubeflow.org_trainjobs.yaml
     manifests/base/crds/trainer.kubeflow.org_clustertrainingruntimes.yaml
     manifests/base/crds/trainer.kubeflow.org_trainingruntimes.yaml"
  "github.com/prometheus-operator/prometheus-operator@v0.85.0
     example/prometheus-operator-crd/monitoring.coreos.com_podmonitors.yaml
     example/prometheus-operator-crd/monitoring.coreos.com_prometheusrules.yaml
     example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml"
)
CRD_DIR="$CACHE_ROOT/crds-$(printf '%s\n' "${CRD_SOURCES[@]}" | sha256sum | cut -c1-12)"

case "${1:-}" in
  --print) echo "$BIN_DIR"; exit 0 ;;
  --print-crds) echo "$CRD_DIR"; exit 0 ;;
esac

if ! command -v go >/dev/null; then
  echo "k8s-stack: 'go' is not on PATH; the cluster tests need Go (>= 1.26) and the Go module proxy" >&2
  exit 1
fi

if [[ -z "$K8S_VERSION" || -z "$ETCD_VERSION" ]]; then
  echo "k8s-stack: cannot read the k8s.io/kubernetes or etcd version from $MODULE_DIR/go.mod" >&2
  exit 1
fi
mkdir -p "$BIN_DIR"
major_minor=${K8S_VERSION#v}
major=${major_minor%%.*}
minor=${major_minor#*.}; minor=${minor%%.*}
version_flags=""
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  version_flags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
  version_flags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done

declare -A PACKAGES=(
  [etcd]=go.etcd.io/etcd/server/v3
  [kube-apiserver]=k8s.io/kubernetes/cmd/kube-apiserver
  [kube-controller-manager]=k8s.io/kubernetes/cmd/kube-controller-manager
  [kube-scheduler]=k8s.io/kubernetes/cmd/kube-scheduler
  [kubectl]=k8s.io/kubernetes/cmd/kubectl
)
ORDER=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl)

failed=()
for name in "${ORDER[@]}"; do
  if [[ -x "$BIN_DIR/$name" ]]; then
    continue
  fi
  echo "k8s-stack: building $name ($K8S_VERSION, ${PACKAGES[$name]}) into $BIN_DIR" >&2
  start=$SECONDS
  # Upstream release builds are static (CGO off), trimmed, with these tags.
  if (cd "$MODULE_DIR" && CGO_ENABLED=0 GOFLAGS=-mod=mod go build -trimpath -tags selinux,notest,grpcnotrace \
        -ldflags "-s -w $version_flags" -o "$BIN_DIR/$name.partial" "${PACKAGES[$name]}") 2>"$BIN_DIR/$name.log"; then
    mv "$BIN_DIR/$name.partial" "$BIN_DIR/$name"   # a killed build never leaves a binary that looks complete
    rm -f "$BIN_DIR/$name.log"
    echo "k8s-stack: $name built in $((SECONDS - start)) s" >&2
  else
    echo "k8s-stack: FAILED to build $name from ${PACKAGES[$name]}:" >&2
    tail -20 "$BIN_DIR/$name.log" >&2
    failed+=("$name")
  fi
done

# Components with no replace lines are `go install`ed at a pinned version, each into a file named by it.
KWOK_VERSION=v0.8.0
TRAINING_OPERATOR_VERSION=v1.9.3
KUEUE_VERSION=v0.17.0
INSTALLS=(
  "kwok-$KWOK_VERSION sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"
  "training-operator-$TRAINING_OPERATOR_VERSION github.com/kubeflow/training-operator/cmd/training-operator.v1@$TRAINING_OPERATOR_VERSION"
  "kueue-$KUEUE_VERSION sigs.k8s.io/kueue/cmd/kueue@$KUEUE_VERSION"   # tests/cluster/training (its CRDs: the module's)
  "versitygw-v1.8.0 github.com/versity/versitygw/cmd/versitygw@v1.8.0"   # S3 server of tests/storage (Apache-2.0)
)
for install in "${INSTALLS[@]}"; do
  read -r name package <<<"$install"
  [[ -x "$BIN_DIR/$name" ]] && continue
  echo "k8s-stack: building $name ($package)" >&2
  start=$SECONDS
  gobin=$(mktemp -d)
  if GOBIN="$gobin" CGO_ENABLED=0 go install -trimpath -ldflags "-s -w" "$package" 2>"$BIN_DIR/$name.log"; then
    mv "$gobin"/* "$BIN_DIR/$name" && rm -f "$BIN_DIR/$name.log"
    echo "k8s-stack: $name built in $((SECONDS - start)) s" >&2
  else
    echo "k8s-stack: FAILED to build $name from $package:" >&2
    tail -20 "$BIN_DIR/$name.log" >&2
    failed+=("$name")
  fi
  rm -rf "$gobin"
done

if [[ ! -d "$CRD_DIR" ]]; then
  partial="$CRD_DIR.partial"
  rm -rf "$partial" && mkdir -p "$partial"
  for source in "${CRD_SOURCES[@]}"; do
    read -r -a words <<<"$(echo $source)"
    module=${words[0]}
    if ! dir=$(go mod download -json "$module" 2>"$partial/error.log" | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p') \
        || [[ -z "$dir" ]]; then
      echo "k8s-stack: FAILED to download $module for its CRDs: $(tail -3 "$partial/error.log")" >&2
      failed+=("crds:$module")
      continue
    fi
    for file in "${words[@]:1}"; do cp "$dir/$file" "$partial/"; done
  done
  rm -f "$partial/error.log"
  ((${#failed[@]})) || mv "$partial" "$CRD_DIR"
  echo "k8s-stack: upstream CRDs in $CRD_DIR" >&2
fi

if ((${#failed[@]})); then
  echo "k8s-stack: could not build: ${failed[*]} (logs in $BIN_DIR/*.log); the cluster tests will fail" >&2
  exit 1
fi
echo "$BIN_DIR"
