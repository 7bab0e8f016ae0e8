{{/*
Names and labels shared by every template.
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "modelpool.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" }}
{{- end }}

{{/*
The object name prefix: fullnameOverride, else the release name when it already contains the chart
name, else "<release>-<chart>". Kept to 40 characters so that suffixes fit in 63.
*/}}
{{- define "modelpool.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "modelpool.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object. */}}
{{- define "modelpool.labels" -}}
helm.sh/chart: {{ include "modelpool.chart" . }}
app.kubernetes.io/name: {{ include "modelpool.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: modelpool
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The operator pods' selector labels. */}}
{{- define "modelpool.operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "modelpool.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "modelpool.operator.labels" -}}
{{ include "modelpool.labels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "modelpool.operator.name" -}}
{{- printf "%s-operator" (include "modelpool.fullname" .) }}
{{- end }}

{{- define "modelpool.operator.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (include "modelpool.operator.name" .) .Values.operator.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "modelpool.operator.leaseName" -}}
{{- default (include "modelpool.operator.name" .) .Values.operator.leaderElection.leaseName }}
{{- end }}

{{- define "modelpool.webhook.name" -}}
{{- printf "%s-webhook" (include "modelpool.fullname" .) }}
{{- end }}

{{/* The cluster-wide MutatingWebhookConfiguration's name: unique per release namespace. */}}
{{- define "modelpool.webhook.configName" -}}
{{- printf "%s-%s" (include "modelpool.fullname" .) .Release.Namespace | trunc 253 | trimSuffix "-" }}
{{- end }}

{{- define "modelpool.webhook.certSecretName" -}}
{{- default (printf "%s-webhook-tls" (include "modelpool.fullname" .)) .Values.webhook.certSecretName }}
{{- end }}

{{- define "modelpool.sidecar.name" -}}
{{- printf "%s-sidecar" (include "modelpool.fullname" .) }}
{{- end }}

{{/* Cluster-scoped names carry the release namespace too, so two releases do not collide. */}}
{{- define "modelpool.clusterName" -}}
{{- printf "%s-%s" (include "modelpool.fullname" .) .Release.Namespace | trunc 253 | trimSuffix "-" }}
{{- end }}

{{/* "<repository>:<tag>" or "<repository>@<digest>". Call with (dict "image" .Values.x.image "root" $). */}}
{{- define "modelpool.image" -}}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) }}
{{- end }}
{{- end }}

{{/*
Whether an optional object is on: "auto" means "when the cluster serves this API".
Call with (dict "enabled" <value> "api" "<group/version[/Kind]>" "root" $); prints "true" or "".
*/}}
{{- define "modelpool.enabledFor" -}}
{{- if eq (toString .enabled) "auto" }}
{{- if .root.Capabilities.APIVersions.Has .api }}true{{ end }}
{{- else if eq (toString .enabled) "true" }}true{{ end }}
{{- end }}

{{/* The webhook Service's DNS names, one a line (the serving certificate's names). */}}
{{- define "modelpool.webhook.dnsNames" -}}
{{ include "modelpool.webhook.name" . }}.{{ .Release.Namespace }}.svc
{{ include "modelpool.webhook.name" . }}.{{ .Release.Namespace }}.svc.cluster.local
{{- end }}
