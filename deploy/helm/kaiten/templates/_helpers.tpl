{{/* Names: <release>-kaiten-<component>, cut to 63 characters. */}}
{{- define "kaiten.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "kaiten.labels" -}}
app.kubernetes.io/name: kaiten
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "kaiten.selector" -}}
app.kubernetes.io/name: kaiten
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "kaiten.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{- define "kaiten.calloutImage" -}}
{{- with .Values.nats.callout.image -}}
{{- if .repository -}}{{- printf "%s:%s" .repository (.tag | default $.Chart.AppVersion) -}}{{- else -}}{{- include "kaiten.image" $ -}}{{- end -}}
{{- end -}}
{{- end -}}

{{/* The four services (the one list of them: Deployments, identities and NATS users range over it),
with their durable consumers and KV buckets (the NATS permissions follow); "leader": its replicas elect
one (kaiten_leaders, under the service's name). */}}
{{- define "kaiten.services" -}}
watcher: {durable: status-writer, buckets: [kaiten_watcher_published], leader: true, publish: ["kaiten.workspace.observed.>", "kaiten.workspace.deleting.>", "kaiten.status.condition.>"]}
planner: {durable: planner, buckets: [kaiten_plans], publish: ["kaiten.plan.>", "kaiten.status.condition.>"]}
provisioner: {durable: provisioner, buckets: [kaiten_nodes], leader: true, publish: ["kaiten.nodes.>", "kaiten.status.>"]}
workload: {durable: workload, buckets: [kaiten_workloads], leader: true, publish: ["kaiten.workload.>", "kaiten.status.>"]}
{{- end -}}

{{- define "kaiten.natsUrl" -}}
{{- if .Values.nats.url -}}
{{- .Values.nats.url -}}
{{- else -}}
{{- $scheme := ternary "tls" "nats" .Values.nats.tls.enabled -}}
{{- $host := ternary "127.0.0.1" (printf "%s-nats.%s.svc" (include "kaiten.fullname" .) .Release.Namespace) .Values.hostNetwork -}}
{{- printf "%s://%s:%v" $scheme $host .Values.nats.port -}}
{{- end -}}
{{- end -}}

{{- define "kaiten.natsSecret" -}}
{{- printf "%s-nats-users" (include "kaiten.fullname" .) -}}
{{- end -}}

{{- define "kaiten.probePort" -}}
{{- index .root.Values.probes.ports .component | default .root.Values.probes.port -}}
{{- end -}}

{{/* A password kept across upgrades: the existing Secret's, else a new random one. */}}
{{- define "kaiten.password" -}}
{{- $existing := lookup "v1" "Secret" .root.Release.Namespace (include "kaiten.natsSecret" .root) -}}
{{- if and $existing (index $existing.data .user) -}}
{{- index $existing.data .user | b64dec -}}
{{- else -}}
{{- randAlphaNum 40 -}}
{{- end -}}
{{- end -}}
