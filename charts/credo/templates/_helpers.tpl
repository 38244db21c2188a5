{{/* Chart name, overridable with nameOverride. */}}
{{- define "credo.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Resource name prefix: <release>-credo, or fullnameOverride. */}}
{{- define "credo.fullname" -}}
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

{{/* chart label value: name-version. */}}
{{- define "credo.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every resource. */}}
{{- define "credo.labels" -}}
helm.sh/chart: {{ include "credo.chart" . }}
{{ include "credo.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: server
{{- end }}

{{/* Labels that select the server pods. */}}
{{- define "credo.selectorLabels" -}}
app.kubernetes.io/name: {{ include "credo.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* ServiceAccount name. */}}
{{- define "credo.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "credo.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Container image reference. */}}
{{- define "credo.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Fixed paths inside the container. */}}
{{- define "credo.configDir" -}}/etc/credo{{- end }}
{{/*
The data volume is mounted one level above the data directory: the server creates the data
directory itself and chmods it 0700, which it could not do to a volume root (owned by root).
The same holds for the admin socket's private/ directory under the run volume.
*/}}
{{- define "credo.dataVolumeDir" -}}/var/lib/credo{{- end }}
{{- define "credo.dataDir" -}}/var/lib/credo/server{{- end }}
{{- define "credo.runDir" -}}/run/credo-server{{- end }}
{{- define "credo.adminSocket" -}}/run/credo-server/private/api.sock{{- end }}
{{- define "credo.upstreamCaDir" -}}/etc/credo/upstream-ca{{- end }}
{{- define "credo.grpcPort" -}}8081{{- end }}

{{/* Name of the Secret holding the PostgreSQL URL, and its key. */}}
{{- define "credo.datastoreSecretName" -}}
{{- default (printf "%s-datastore" (include "credo.fullname" .)) .Values.datastore.postgresql.existingSecret }}
{{- end }}
{{- define "credo.datastoreSecretKey" -}}
{{- if .Values.datastore.postgresql.existingSecret }}
{{- .Values.datastore.postgresql.existingSecretKey }}
{{- else -}}
url
{{- end }}
{{- end }}

{{/*
Check values the schema also checks (so a render with --skip-schema-validation still
refuses them) and the combinations a JSON schema cannot express. Renders nothing.
*/}}
{{- define "credo.validate" -}}
{{- $keyTypes := list "ec-p256" "ec-p384" "rsa-2048" }}
{{- $v := .Values }}
{{- range $name := list "caKeyType" "jwtKeyType" }}
{{- $value := index $v.server $name }}
{{- if not (has $value $keyTypes) }}
{{- fail (printf "server.%s: %q is not one of %s" $name $value (join ", " $keyTypes)) }}
{{- end }}
{{- end }}
{{- if not (has $v.server.logLevel (list "debug" "info" "warning" "error")) }}
{{- fail (printf "server.logLevel: %q is not one of debug, info, warning, error" $v.server.logLevel) }}
{{- end }}
{{- if not (has $v.server.logFormat (list "json" "text")) }}
{{- fail (printf "server.logFormat: %q is not one of json, text" $v.server.logFormat) }}
{{- end }}
{{- if not (has $v.datastore.type (list "sqlite" "postgresql")) }}
{{- fail (printf "datastore.type: %q is not one of sqlite, postgresql" $v.datastore.type) }}
{{- end }}
{{- if not (has $v.service.type (list "ClusterIP" "NodePort" "LoadBalancer")) }}
{{- fail (printf "service.type: %q is not one of ClusterIP, NodePort, LoadBalancer" $v.service.type) }}
{{- end }}
{{- $pg := $v.datastore.postgresql }}
{{- if eq $v.datastore.type "postgresql" }}
{{- if and $pg.url $pg.existingSecret }}
{{- fail "datastore.postgresql: set url or existingSecret, not both" }}
{{- end }}
{{- if not (or $pg.url $pg.existingSecret) }}
{{- fail "datastore.type=postgresql needs datastore.postgresql.url or datastore.postgresql.existingSecret" }}
{{- end }}
{{- else }}
{{- if or $pg.url $pg.existingSecret }}
{{- fail "datastore.postgresql.url/existingSecret are set but datastore.type is sqlite: set datastore.type=postgresql" }}
{{- end }}
{{- if gt (int $v.replicas) 1 }}
{{- fail (printf "replicas=%d needs a shared PostgreSQL datastore: SQLite lives in one pod's data directory. Set datastore.type=postgresql with datastore.postgresql.existingSecret (or url), or replicas=1" (int $v.replicas)) }}
{{- end }}
{{- end }}
{{- if and $v.upstreamCa.enabled (not $v.upstreamCa.existingSecret) }}
{{- fail "upstreamCa.enabled needs upstreamCa.existingSecret: a kubernetes.io/tls Secret with tls.crt and tls.key" }}
{{- end }}
{{- if and $v.service.nodePort (eq $v.service.type "ClusterIP") }}
{{- fail "service.nodePort needs service.type NodePort or LoadBalancer" }}
{{- end }}
{{- if and $v.metrics.enabled (eq (int $v.metrics.port) 8081) }}
{{- fail "metrics.port must differ from the agent endpoint port 8081" }}
{{- end }}
{{- end }}

{{/* server.toml, the file `credo-server run --config` reads. */}}
{{- define "credo.serverConfig" -}}
{{- $s := .Values.server -}}
# Rendered by the credo Helm chart from its values; `credo-server run --config` reads it.
# The PostgreSQL datastore URL, if any, is passed as --datastore from a Secret, not written here.
[server]
trust_domain = {{ $s.trustDomain | toJson }}
data_dir = {{ include "credo.dataDir" . | toJson }}
bind_address = {{ printf "0.0.0.0:%s" (include "credo.grpcPort" .) | toJson }}
admin_socket = {{ include "credo.adminSocket" . | toJson }}
ca_ttl = {{ $s.caTtl | toString | toJson }}
x509_svid_ttl = {{ $s.x509SvidTtl | toString | toJson }}
jwt_svid_ttl = {{ $s.jwtSvidTtl | toString | toJson }}
{{- if $s.agentSvidTtl }}
agent_svid_ttl = {{ $s.agentSvidTtl | toString | toJson }}
{{- end }}
join_token_ttl = {{ $s.joinTokenTtl | toString | toJson }}
ca_key_type = {{ $s.caKeyType | toJson }}
jwt_key_type = {{ $s.jwtKeyType | toJson }}
log_level = {{ $s.logLevel | toJson }}
log_format = {{ $s.logFormat | toJson }}
attestation_rate_limit = {{ $s.attestationRateLimit | float64 | toJson }}
signing_rate_limit = {{ $s.signingRateLimit | float64 | toJson }}
signing_workers = {{ $s.signingWorkers | int }}
rotation_check_interval = {{ $s.rotationCheckInterval | float64 | toJson }}
{{- if .Values.metrics.enabled }}
metrics_address = {{ printf "0.0.0.0:%d" (int .Values.metrics.port) | toJson }}
{{- end }}
{{- if .Values.upstreamCa.enabled }}
upstream_ca_cert = {{ printf "%s/tls.crt" (include "credo.upstreamCaDir" .) | toJson }}
upstream_ca_key = {{ printf "%s/tls.key" (include "credo.upstreamCaDir" .) | toJson }}
{{- end }}
{{- end }}
