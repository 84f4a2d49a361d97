{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "pis-worker.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: <release>-<chart>, or the release name when it already contains the chart name. */}}
{{- define "pis-worker.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "pis-worker.namespace" -}}
{{- default .Release.Namespace .Values.namespaceOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "pis-worker.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels: stable for the life of a release (a Deployment's selector is immutable). */}}
{{- define "pis-worker.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pis-worker.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Standard labels for every resource. */}}
{{- define "pis-worker.labels" -}}
helm.sh/chart: {{ include "pis-worker.chart" . }}
{{ include "pis-worker.selectorLabels" . }}
app.kubernetes.io/version: {{ include "pis-worker.imageTag" . | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/component: worker
app.kubernetes.io/part-of: pis
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "pis-worker.imageTag" -}}
{{- default .Chart.AppVersion .Values.image.tag }}
{{- end }}

{{- define "pis-worker.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (include "pis-worker.imageTag" .) }}
{{- end }}
{{- end }}

{{- define "pis-worker.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "pis-worker.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "pis-worker.secretName" -}}
{{- default (printf "%s-secrets" (include "pis-worker.fullname" .)) .Values.secrets.existingSecret }}
{{- end }}

{{/*
Environment variables that point the worker at its secret files:
a list of (env var, key in the secret) pairs, as YAML, for the keys the values ask for.
*/}}
{{- define "pis-worker.secretFiles" -}}
{{- $s := .Values.secrets }}
{{- $k := $s.keys }}
- {env: PIS_CLIENT_SECRET_FILE, key: {{ $k.clientSecret | quote }}}
- {env: PIS_STATE_KEY_FILE, key: {{ $k.stateKey | quote }}}
{{- if $s.stateKeysPrevious }}
- {env: PIS_STATE_KEYS_PREVIOUS_FILE, key: {{ $k.stateKeysPrevious | quote }}}
{{- end }}
{{- if eq $s.qwac "pem" }}
- {env: PIS_QWAC_CERT_FILE, key: {{ $k.qwacCert | quote }}}
- {env: PIS_QWAC_KEY_FILE, key: {{ $k.qwacKey | quote }}}
{{- else if eq $s.qwac "p12" }}
- {env: PIS_QWAC_P12_FILE, key: {{ $k.qwacP12 | quote }}}
- {env: PIS_QWAC_P12_PASSWORD_FILE, key: {{ $k.qwacP12Password | quote }}}
{{- end }}
{{- if $s.qseal }}
- {env: PIS_QSEAL_KEY_FILE, key: {{ $k.qsealKey | quote }}}
{{- if $s.qsealCertificate }}
- {env: PIS_QSEAL_CERT_FILE, key: {{ $k.qsealCert | quote }}}
{{- end }}
{{- end }}
{{- if $s.bankCa }}
- {env: PIS_BANK_CA_FILE, key: {{ $k.bankCa | quote }}}
{{- end }}
{{- end }}

{{/* A config value as an integer (milliseconds etc.), or the given default when the key is absent. */}}
{{- define "pis-worker.configInt" -}}
{{- $v := index .config .key }}
{{- if kindIs "invalid" $v }}{{ .default }}{{ else }}{{ $v | toString | atoi }}{{ end }}
{{- end }}

{{/*
Render-time checks that a JSON schema cannot express (they compare two values).
- the grace period outlasts the rebalance drain plus the margin for checkpoint, commit and flush;
- the drain bound stays below the Kafka session timeout (docs/guarantees.md).
The defaults are the binary's own (src/cli/run.rs) for keys removed from `config`.
*/}}
{{- define "pis-worker.validate" -}}
{{- $drainMs := include "pis-worker.configInt" (dict "config" .Values.config "key" "PIS_DRAIN_TIMEOUT_MS" "default" 10000) | atoi }}
{{- $sessionMs := include "pis-worker.configInt" (dict "config" .Values.config "key" "PIS_SESSION_TIMEOUT_MS" "default" 30000) | atoi }}
{{- $drainS := div (add $drainMs 999) 1000 }}
{{- $grace := int .Values.terminationGracePeriodSeconds }}
{{- $margin := int .Values.shutdown.marginSeconds }}
{{- if le $grace (add $drainS $margin) }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be larger than PIS_DRAIN_TIMEOUT_MS/1000 (%d) + shutdown.marginSeconds (%d) = %d, or SIGKILL cuts the rebalance drain short" $grace $drainS $margin (add $drainS $margin)) }}
{{- end }}
{{- if ge $drainMs $sessionMs }}
{{- fail (printf "PIS_DRAIN_TIMEOUT_MS (%d) must stay below PIS_SESSION_TIMEOUT_MS (%d) (docs/guarantees.md)" $drainMs $sessionMs) }}
{{- end }}
{{- if and .Values.autoscaling.enabled (lt (int .Values.autoscaling.maxReplicas) (int .Values.autoscaling.minReplicas)) }}
{{- fail "autoscaling.maxReplicas must be at least autoscaling.minReplicas" }}
{{- end }}
{{- if and .Values.autoscaling.enabled (not .Values.autoscaling.targetCPUUtilizationPercentage) (not .Values.autoscaling.targetMemoryUtilizationPercentage) }}
{{- fail "autoscaling: set targetCPUUtilizationPercentage or targetMemoryUtilizationPercentage" }}
{{- end }}
{{- end }}

{{/* Probe timing fields from a probes.* entry. */}}
{{- define "pis-worker.probeTiming" -}}
initialDelaySeconds: {{ .initialDelaySeconds }}
periodSeconds: {{ .periodSeconds }}
timeoutSeconds: {{ .timeoutSeconds }}
failureThreshold: {{ .failureThreshold }}
successThreshold: {{ .successThreshold }}
{{- end }}
