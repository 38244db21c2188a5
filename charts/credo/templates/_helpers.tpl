{{/* Chart name, overridable with nameOverride. */}}
{{- define "credo.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Resource name prefix: <release>-credo, or fullnameOverride. Components append -server / -agent. */}}
{{- define "credo.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Names of the two components' resources. */}}
{{- define "credo.serverName" -}}{{ include "credo.fullname" . }}-server{{- end }}
{{- define "credo.agentName" -}}{{ include "credo.fullname" . }}-agent{{- end }}

{{/* chart label value: name-version. */}}
{{- define "credo.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels on every resource of a component: (list $ "server") or (list $ "agent").
The component label is part of the selector too, so the server's Services and
PodDisruptionBudget never select agent pods and the reverse.
*/}}
{{- define "credo.labels" -}}
{{- $ctx := index . 0 -}}
helm.sh/chart: {{ include "credo.chart" $ctx }}
{{ include "credo.selectorLabels" . }}
app.kubernetes.io/version: {{ $ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ $ctx.Release.Service }}
app.kubernetes.io/part-of: credo
{{- end }}

{{/* Labels that select one component's pods: (list $ "server") or (list $ "agent"). */}}
{{- define "credo.selectorLabels" -}}
{{- $ctx := index . 0 -}}
{{- $component := index . 1 -}}
app.kubernetes.io/name: {{ include "credo.name" $ctx }}
app.kubernetes.io/instance: {{ $ctx.Release.Name }}
app.kubernetes.io/component: {{ $component }}
{{- end }}

{{/* ServiceAccount names. */}}
{{- define "credo.serverServiceAccountName" -}}
{{- if .Values.server.serviceAccount.create }}
{{- default (include "credo.serverName" .) .Values.server.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.server.serviceAccount.name }}
{{- end }}
{{- end }}
{{- define "credo.agentServiceAccountName" -}}
{{- if .Values.agent.serviceAccount.create }}
{{- default (include "credo.agentName" .) .Values.agent.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.agent.serviceAccount.name }}
{{- end }}
{{- end }}
{{- define "credo.testServiceAccountName" -}}{{ include "credo.fullname" . }}-test{{- end }}

{{/* Container image reference. */}}
{{- define "credo.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
Fixed paths inside the containers. The image creates none of the writable ones: each is a
volume, because the root filesystem is read-only.
The server's data volume is mounted one level above the data directory: the server creates
the data directory itself and chmods it 0700, which it could not do to a volume root (owned
by root). The same holds for the admin socket's private/ directory under the run volume.
*/}}
{{- define "credo.configDir" -}}/etc/credo{{- end }}
{{- define "credo.dataVolumeDir" -}}/var/lib/credo{{- end }}
{{- define "credo.dataDir" -}}/var/lib/credo/server{{- end }}
{{- define "credo.runDir" -}}/run/credo-server{{- end }}
{{- define "credo.adminSocket" -}}/run/credo-server/private/api.sock{{- end }}
{{- define "credo.upstreamCaDir" -}}/etc/credo/upstream-ca{{- end }}
{{- define "credo.httpTlsDir" -}}/etc/credo/http-tls{{- end }}
{{- define "credo.delegationDir" -}}/etc/credo/delegation{{- end }}

{{/*
The files of the delegation issuers (JWKS documents, CA bundles), as ConfigMap data:
"<name>-jwks.json" and "<name>-ca.pem"; empty when no issuer has any.
*/}}
{{- define "credo.delegationFiles" -}}
{{- range $name, $i := .Values.server.delegation.issuers }}
{{- if $i.jwks }}
{{ printf "%s-jwks.json" $name }}: |
  {{- $i.jwks | nindent 2 }}
{{- end }}
{{- if $i.caBundle }}
{{ printf "%s-ca.pem" $name }}: |
  {{- $i.caBundle | nindent 2 }}
{{- end }}
{{- end }}
{{- end }}
{{- define "credo.grpcPort" -}}8081{{- end }}
{{- define "credo.agentDataVolumeDir" -}}/var/lib/credo-agent{{- end }}
{{- define "credo.agentDataDir" -}}/var/lib/credo-agent/agent{{- end }}
{{- define "credo.agentAdminDir" -}}/run/credo-agent/private{{- end }}
{{- define "credo.agentAdminSocket" -}}/run/credo-agent/private/admin.sock{{- end }}
{{- define "credo.bundleDir" -}}/etc/credo/bundle{{- end }}
{{/* The ConfigMap key the server's bundle publisher writes and agents read. */}}
{{- define "credo.bundleKey" -}}bundle.pem{{- end }}
{{- define "credo.agentTokenDir" -}}/var/run/secrets/tokens{{- end }}
{{- define "credo.agentTokenFile" -}}credo-agent{{- end }}
{{- define "credo.agentTokenPath" -}}/var/run/secrets/tokens/credo-agent{{- end }}
{{- define "credo.podTokenPath" -}}/var/run/secrets/kubernetes.io/serviceaccount/token{{- end }}
{{- define "credo.podCaPath" -}}/var/run/secrets/kubernetes.io/serviceaccount/ca.crt{{- end }}
{{/* Where the helm test pod (and the README's example workload) mounts the socket directory. */}}
{{- define "credo.workloadSocketDir" -}}/spiffe-workload-api{{- end }}
{{/* uids of the image's users (Dockerfile): the server, the agent. */}}
{{- define "credo.serverUid" -}}10001{{- end }}
{{- define "credo.agentUid" -}}10002{{- end }}

{{/* The host directory holding the Workload API socket, and the socket's file name. */}}
{{- define "credo.socketHostDir" -}}{{ dir .Values.agent.socketPath }}{{- end }}
{{- define "credo.socketFile" -}}{{ base .Values.agent.socketPath }}{{- end }}

{{/* The bundle ConfigMap's name. */}}
{{- define "credo.bundleConfigMapName" -}}
{{- default (printf "%s-bundle" (include "credo.fullname" .)) .Values.bundle.configMapName }}
{{- end }}

{{/* The node alias every agent of this cluster belongs to (selector k8s_psat:cluster:<name>). */}}
{{- define "credo.nodeAliasId" -}}
{{- default (printf "spiffe://%s/k8s-cluster/%s" .Values.trustDomain .Values.clusterName) .Values.server.nodeAlias.spiffeId }}
{{- end }}

{{/* The helm test pod's SPIFFE ID. */}}
{{- define "credo.testSpiffeId" -}}
{{- printf "spiffe://%s/ns/%s/sa/%s" .Values.trustDomain .Release.Namespace (include "credo.testServiceAccountName" .) }}
{{- end }}

{{/* The audience of the agents' projected token: the first audience the server accepts. */}}
{{- define "credo.agentTokenAudience" -}}
{{- first .Values.server.nodeAttestor.k8sPsat.audience }}
{{- end }}

{{/* The agent Service account the server's k8s_psat attestor admits: "<namespace>:<name>". */}}
{{- define "credo.agentAllowListEntry" -}}
{{- printf "%s:%s" .Release.Namespace (include "credo.agentServiceAccountName" .) }}
{{- end }}

{{/* Name of the Secret holding the PostgreSQL URL, and its key. */}}
{{- define "credo.datastoreSecretName" -}}
{{- default (printf "%s-datastore" (include "credo.fullname" .)) .Values.server.datastore.postgresql.existingSecret }}
{{- end }}
{{- define "credo.datastoreSecretKey" -}}
{{- if .Values.server.datastore.postgresql.existingSecret }}
{{- .Values.server.datastore.postgresql.existingSecretKey }}
{{- else -}}
url
{{- end }}
{{- end }}

{{/* `fail` unless $value is one of $allowed: (list "server.logLevel" $value (list "debug" ...)). */}}
{{- define "credo.enum" -}}
{{- $name := index . 0 }}
{{- $value := index . 1 }}
{{- $allowed := index . 2 }}
{{- if not (has $value $allowed) }}
{{- fail (printf "%s: %q is not one of %s" $name (toString $value) (join ", " $allowed)) }}
{{- end }}
{{- end }}

{{/*
Check values the schema also checks (so a render with --skip-schema-validation still
refuses them) and the combinations a JSON schema cannot express. Renders nothing.
*/}}
{{- define "credo.validate" -}}
{{- $keyTypes := list "ec-p256" "ec-p384" "rsa-2048" }}
{{- $levels := list "debug" "info" "warning" "error" }}
{{- $formats := list "json" "text" }}
{{- $v := .Values }}
{{- $s := $v.server }}
{{- include "credo.enum" (list "image.pullPolicy" $v.image.pullPolicy (list "Always" "IfNotPresent" "Never")) }}
{{- include "credo.enum" (list "server.caKeyType" $s.caKeyType $keyTypes) }}
{{- include "credo.enum" (list "server.jwtKeyType" $s.jwtKeyType $keyTypes) }}
{{- include "credo.enum" (list "server.logLevel" $s.logLevel $levels) }}
{{- include "credo.enum" (list "server.logFormat" $s.logFormat $formats) }}
{{- include "credo.enum" (list "server.datastore.type" $s.datastore.type (list "sqlite" "postgresql")) }}
{{- include "credo.enum" (list "server.service.type" $s.service.type (list "ClusterIP" "NodePort" "LoadBalancer")) }}
{{- include "credo.enum" (list "server.persistence.accessMode" $s.persistence.accessMode (list "ReadWriteOnce" "ReadWriteOncePod")) }}
{{- include "credo.enum" (list "agent.logLevel" $v.agent.logLevel $levels) }}
{{- include "credo.enum" (list "agent.logFormat" $v.agent.logFormat $formats) }}
{{- if not (regexMatch "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$" $v.clusterName) }}
{{- fail (printf "clusterName: %q must be lower-case letters, digits and '-' (at most 63), like a DNS label" $v.clusterName) }}
{{- end }}
{{- $pg := $s.datastore.postgresql }}
{{- if eq $s.datastore.type "postgresql" }}
{{- if and $pg.url $pg.existingSecret }}
{{- fail "server.datastore.postgresql: set url or existingSecret, not both" }}
{{- end }}
{{- if not (or $pg.url $pg.existingSecret) }}
{{- fail "server.datastore.type=postgresql needs server.datastore.postgresql.url or server.datastore.postgresql.existingSecret" }}
{{- end }}
{{- else }}
{{- if or $pg.url $pg.existingSecret }}
{{- fail "server.datastore.postgresql.url/existingSecret are set but server.datastore.type is sqlite: set server.datastore.type=postgresql" }}
{{- end }}
{{- if gt (int $s.replicas) 1 }}
{{- fail (printf "server.replicas=%d needs a shared PostgreSQL datastore: SQLite lives in one pod's data directory. Set server.datastore.type=postgresql with server.datastore.postgresql.existingSecret (or url), or server.replicas=1" (int $s.replicas)) }}
{{- end }}
{{- end }}
{{- if and $s.upstreamCa.enabled (not $s.upstreamCa.existingSecret) }}
{{- fail "server.upstreamCa.enabled needs server.upstreamCa.existingSecret: a kubernetes.io/tls Secret with tls.crt and tls.key" }}
{{- end }}
{{- if and $s.service.nodePort (eq $s.service.type "ClusterIP") }}
{{- fail "server.service.nodePort needs server.service.type NodePort or LoadBalancer" }}
{{- end }}
{{- if and $s.metrics.enabled (eq (int $s.metrics.port) (int (include "credo.grpcPort" .))) }}
{{- fail "server.metrics.port must differ from the agent endpoint port 8081" }}
{{- end }}
{{- if and $v.agent.enabled (not $s.nodeAttestor.k8sPsat.enabled) }}
{{- fail "agent.enabled needs server.nodeAttestor.k8sPsat.enabled: the chart's agents attest with k8s_psat" }}
{{- end }}
{{- if and $s.nodeAlias.enabled (not $s.nodeAttestor.k8sPsat.enabled) }}
{{- fail "server.nodeAlias.enabled needs server.nodeAttestor.k8sPsat.enabled: the node alias selects agents by k8s_psat:cluster" }}
{{- end }}
{{- if and $v.test.enabled (not (and $v.agent.enabled $s.nodeAlias.enabled)) }}
{{- fail "test.enabled needs agent.enabled and server.nodeAlias.enabled: the helm test fetches an SVID from an agent, under the node alias; set test.enabled=false" }}
{{- end }}
{{- $alias := include "credo.nodeAliasId" . }}
{{- $prefix := printf "spiffe://%s/" $v.trustDomain }}
{{- if not (hasPrefix $prefix $alias) }}
{{- fail (printf "server.nodeAlias.spiffeId: %q must be in the trust domain (start with %s)" $alias $prefix) }}
{{- end }}
{{- if hasPrefix (printf "%scredo/" $prefix) $alias }}
{{- fail (printf "server.nodeAlias.spiffeId: %q is under /credo/, which is reserved for the server and its agents" $alias) }}
{{- end }}
{{- if and $s.http.enabled $s.http.insecureHttp $s.http.tls.existingSecret }}
{{- fail "server.http: insecureHttp serves no certificate; unset server.http.tls.existingSecret or insecureHttp" }}
{{- end }}
{{- if and $s.http.enabled (has (int $s.http.port) (list (int (include "credo.grpcPort" .)) (int $s.metrics.port))) }}
{{- fail "server.http.port must differ from the agent endpoint port 8081 and server.metrics.port" }}
{{- end }}
{{- if and (or $s.delegation.issuers $s.delegation.introspectionAllowed) (not $s.http.enabled) }}
{{- fail "server.delegation needs server.http.enabled: token exchange and introspection are served by the HTTP front end" }}
{{- end }}
{{- if hasPrefix "/run/credo-agent/" (printf "%s/" (include "credo.socketHostDir" .)) }}
{{- fail (printf "agent.socketPath: %q is inside /run/credo-agent, the agent's private directory; choose another directory" $v.agent.socketPath) }}
{{- end }}
{{- end }}

{{/* server.toml, the file `credo-server run --config` reads. */}}
{{- define "credo.serverConfig" -}}
{{- $s := .Values.server -}}
{{- $psat := $s.nodeAttestor.k8sPsat -}}
# Rendered by the credo Helm chart from its values; `credo-server run --config` reads it.
# The PostgreSQL datastore URL, if any, is passed as --datastore from a Secret, not written here.
[server]
trust_domain = {{ .Values.trustDomain | toJson }}
data_dir = {{ include "credo.dataDir" . | toJson }}
bind_address = {{ printf "0.0.0.0:%s" (include "credo.grpcPort" .) | toJson }}
admin_socket = {{ include "credo.adminSocket" . | toJson }}
ca_ttl = {{ $s.caTtl | toString | toJson }}
x509_svid_ttl = {{ $s.x509SvidTtl | toString | toJson }}
jwt_svid_ttl = {{ $s.jwtSvidTtl | toString | toJson }}
{{- if $s.witSvidTtl }}
wit_svid_ttl = {{ $s.witSvidTtl | toString | toJson }}
{{- end }}
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
join_token_max_ttl = {{ $s.joinTokenMaxTtl | toString | toJson }}
crl_next_update = {{ $s.crlNextUpdate | toString | toJson }}
jwt_issuer = {{ $s.jwtIssuer | toJson }}
{{- if $s.bundleRefreshHint }}
bundle_refresh_hint = {{ $s.bundleRefreshHint | toString | toJson }}
{{- end }}
audit_checkpoint_interval = {{ $s.auditCheckpointInterval | toString | toJson }}
sync_heartbeat_interval = {{ $s.syncHeartbeatInterval | float64 | toJson }}
require_entry_owner = {{ $s.requireEntryOwner }}
{{- if $s.metrics.enabled }}
metrics_address = {{ printf "0.0.0.0:%d" (int $s.metrics.port) | toJson }}
{{- end }}
{{- if $s.upstreamCa.enabled }}
upstream_ca_cert = {{ printf "%s/tls.crt" (include "credo.upstreamCaDir" .) | toJson }}
upstream_ca_key = {{ printf "%s/tls.key" (include "credo.upstreamCaDir" .) | toJson }}
{{- end }}
{{- if $s.nodeAttestor.joinToken.enabled }}

# Join tokens (`credo-server token generate`), for agents outside the cluster.
[server.node_attestor.join_token]
{{- end }}
{{- if $psat.enabled }}

# Agents of this cluster prove their node with a projected service account token, checked
# with a TokenReview; the agent's pod and node are then read from the Kubernetes API.
[server.node_attestor.k8s_psat.clusters.{{ .Values.clusterName | toJson }}]
service_account_allow_list = {{ prepend $psat.serviceAccountAllowList (include "credo.agentAllowListEntry" .) | uniq | toJson }}
audience = {{ $psat.audience | toJson }}
# Empty: the in-cluster configuration (the server pod's service account).
kube_config_file = ""
allowed_node_label_keys = {{ $psat.allowedNodeLabelKeys | toJson }}
allowed_pod_label_keys = {{ $psat.allowedPodLabelKeys | toJson }}
{{- end }}

# The trust bundle (PEM) is kept in this ConfigMap; agents bootstrap from it.
[server.bundle_publisher.k8s_configmap]
namespace = {{ .Release.Namespace | toJson }}
name = {{ include "credo.bundleConfigMapName" . | toJson }}
{{- with $s.http }}
{{- if .enabled }}

# The HTTP front end: bundle endpoint, OIDC discovery, token exchange, introspection.
[server.http]
bind_address = {{ printf "0.0.0.0:%d" (int .port) | toJson }}
dns_names = {{ .dnsNames | toJson }}
{{- if .tls.existingSecret }}
tls_cert_file = {{ printf "%s/tls.crt" (include "credo.httpTlsDir" $) | toJson }}
tls_key_file = {{ printf "%s/tls.key" (include "credo.httpTlsDir" $) | toJson }}
{{- end }}
insecure_http = {{ .insecureHttp }}
max_request_bytes = {{ .maxRequestBytes | int64 }}
request_timeout = {{ .requestTimeout | toString | toJson }}
idle_timeout = {{ .idleTimeout | toString | toJson }}
{{- end }}
{{- end }}
{{- with $s.delegation }}
{{- if or .issuer .introspectionAllowed .issuers }}

# Token exchange (RFC 8693): who may introspect, and the people's identity providers.
[server.delegation]
{{- if .issuer }}
issuer = {{ .issuer | toJson }}
{{- end }}
introspection_allowed = {{ .introspectionAllowed | default list | toJson }}
{{- range $name, $i := .issuers }}

[server.delegation.issuers.{{ $name | toJson }}]
issuer = {{ $i.issuer | toJson }}
{{- if and $i.jwksUrl $i.jwks }}
{{- fail (printf "server.delegation.issuers.%s: give jwksUrl or jwks, not both" $name) }}
{{- end }}
{{- if $i.jwksUrl }}
jwks_url = {{ $i.jwksUrl | toJson }}
{{- end }}
{{- if $i.jwks }}
jwks_file = {{ printf "%s/%s-jwks.json" (include "credo.delegationDir" $) $name | toJson }}
{{- end }}
{{- if $i.caBundle }}
ca_file = {{ printf "%s/%s-ca.pem" (include "credo.delegationDir" $) $name | toJson }}
{{- end }}
{{- if $i.audience }}
audience = {{ $i.audience | toJson }}
{{- end }}
{{- if $i.algorithms }}
algorithms = {{ $i.algorithms | toJson }}
{{- end }}
{{- if $i.clockSkew }}
clock_skew = {{ $i.clockSkew | toString | toJson }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* agent.toml, the file `credo-agent run --config` reads. */}}
{{- define "credo.agentConfig" -}}
{{- $a := .Values.agent -}}
# Rendered by the credo Helm chart from its values; `credo-agent run --config` reads it.
[agent]
server_addresses = [{{ printf "%s.%s.svc:%d" (include "credo.serverName" .) .Release.Namespace (int .Values.server.service.port) | toJson }}]
trust_domain = {{ .Values.trustDomain | toJson }}
{{- if $a.trustBundleUrl }}
# The bootstrap bundle, fetched over HTTPS (web PKI) at the first attestation.
trust_bundle_url = {{ $a.trustBundleUrl | toJson }}
trust_bundle_format = {{ $a.trustBundleFormat | toJson }}
{{- else }}
# The bundle ConfigMap the server publishes, mounted as a file: no --insecure-bootstrap.
trust_bundle = {{ printf "%s/%s" (include "credo.bundleDir" .) (include "credo.bundleKey" .) | toJson }}
{{- end }}
socket_path = {{ $a.socketPath | toJson }}
admin_socket = {{ include "credo.agentAdminSocket" . | toJson }}
data_dir = {{ include "credo.agentDataDir" . | toJson }}
log_level = {{ $a.logLevel | toJson }}
log_format = {{ $a.logFormat | toJson }}
svid_cache_max_size = {{ $a.svidCacheMaxSize | int }}
sync_backoff_min = {{ $a.syncBackoffMin | float64 | toJson }}
sync_backoff_max = {{ $a.syncBackoffMax | float64 | toJson }}
svid_wait_timeout = {{ $a.svidWaitTimeout | float64 | toJson }}
{{- if $a.metrics.enabled }}
metrics_address = {{ printf "0.0.0.0:%d" (int $a.metrics.port) | toJson }}
{{- end }}

# The node: a projected service account token for the server's audience.
[agent.node_attestor.k8s_psat]
cluster = {{ .Values.clusterName | toJson }}
token_path = {{ include "credo.agentTokenPath" . | toJson }}

# Workloads: Unix process attributes, and their pod from the kubelet; combined.
[agent.workload_attestor.unix]
workload_size_limit = {{ $a.workloadSizeLimit | int64 }}

[agent.workload_attestor.k8s]
kubelet_secure_port = {{ $a.kubelet.securePort | int }}
node_name_env = "MY_NODE_NAME"
token_path = {{ include "credo.podTokenPath" . | toJson }}
kubelet_ca_path = {{ default (include "credo.podCaPath" .) $a.kubelet.caPath | toJson }}
skip_kubelet_verification = {{ $a.kubelet.skipVerification }}
{{- end }}

{{/*
register-entries.sh: the server container's postStart hook. Waits for the server's admin
socket, then makes sure the node alias (and the helm test's entry) exist. Idempotent.
*/}}
{{- define "credo.registerScript" -}}
#!/bin/sh
# Rendered by the credo Helm chart; the server container's postStart hook runs it.
# Waits until the server answers on its admin socket, then makes sure each entry below
# exists (same SPIFFE ID and exactly these selectors). An entry already there is left
# alone, so a restart, a second replica or `helm upgrade` changes nothing.
set -eu
# The container sets CREDO_SERVER_SOCKET; the default is the same path.
: "${CREDO_SERVER_SOCKET:={{ include "credo.adminSocket" . }}}"
export CREDO_SERVER_SOCKET

tries=0
until credo-server healthcheck --timeout 5 >/dev/null 2>&1; do
    tries=$((tries + 1))
    if [ "$tries" -ge {{ .Values.server.nodeAlias.waitSeconds | int }} ]; then
        echo "register-entries: the server did not become healthy" >&2
        exit 1
    fi
    sleep 1
done

# Selectors are passed as one space-separated word list (none contains a space) and
# split below; never glob them.
set -f

# entry_exists SPIFFE_ID "SELECTOR...": 0 if an entry with that ID and exactly those selectors exists.
entry_exists() {
    args=""
    for s in $2; do args="$args --selector $s"; done
    found=$(credo-server entry show --spiffe-id "$1" --match exact $args)
    case "$found" in
        "Found 0 entries"*) return 1 ;;
    esac
}

# ensure_entry SPIFFE_ID PARENT_ID|--node "SELECTOR..."
ensure_entry() {
    if entry_exists "$1" "$3"; then
        echo "register-entries: $1 exists"
        return 0
    fi
    args=""
    for s in $3; do args="$args --selector $s"; done
    if [ "$2" = "--node" ]; then args="$args --node"; else args="$args --parent-id $2"; fi
    if credo-server entry create --spiffe-id "$1" $args >/dev/null; then
        echo "register-entries: $1 created"
        return 0
    fi
    # A second replica may have created it at the same moment: then it exists, which is fine.
    entry_exists "$1" "$3"
}

# Every agent of cluster {{ .Values.clusterName }}; parent workload entries to it.
ensure_entry {{ include "credo.nodeAliasId" . | squote }} --node {{ printf "k8s_psat:cluster:%s" .Values.clusterName | squote }}
{{- if .Values.test.enabled }}
# The helm test pod (`helm test {{ .Release.Name }}`).
ensure_entry {{ include "credo.testSpiffeId" . | squote }} {{ include "credo.nodeAliasId" . | squote }} {{ printf "k8s:ns:%s k8s:sa:%s" .Release.Namespace (include "credo.testServiceAccountName" .) | squote }}
{{- end }}
{{- end }}
