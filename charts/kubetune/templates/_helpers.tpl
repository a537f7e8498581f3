{{/*
Names. Kubernetes names are at most 63 characters (DNS labels), so every
name is cut to fit, and a component suffix is kept whole by cutting the
prefix instead.
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "kubetune.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* "<release>-<chart>", or just the release name when it already contains the chart name. */}}
{{- define "kubetune.fullname" -}}
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

{{/* "<fullname>-<component>" within 63 characters: the prefix is shortened, never the suffix. */}}
{{- define "kubetune.componentName" -}}
{{- $root := index . 0 -}}
{{- $component := index . 1 }}
{{- $max := int (sub 62 (len $component)) }}
{{- printf "%s-%s" (include "kubetune.fullname" $root | trunc $max | trimSuffix "-") $component }}
{{- end }}

{{- define "kubetune.operator.fullname" -}}
{{- include "kubetune.componentName" (list . "operator") }}
{{- end }}

{{- define "kubetune.suggestion.fullname" -}}
{{- include "kubetune.componentName" (list . "suggestion") }}
{{- end }}

{{/* Chart label value: name-version, "+" is not allowed in label values. */}}
{{- define "kubetune.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every resource. Call with (list $ "component"). */}}
{{- define "kubetune.labels" -}}
{{- $root := index . 0 -}}
helm.sh/chart: {{ include "kubetune.chart" $root }}
{{ include "kubetune.selectorLabels" . }}
app.kubernetes.io/version: {{ $root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ $root.Release.Service }}
app.kubernetes.io/part-of: kubetune
{{- with $root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels: stable across upgrades (a Deployment's selector is immutable). */}}
{{- define "kubetune.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "kubetune.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- define "kubetune.operator.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (include "kubetune.operator.fullname" .) .Values.operator.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "kubetune.suggestion.serviceAccountName" -}}
{{- if .Values.suggestion.serviceAccount.create }}
{{- default (include "kubetune.suggestion.fullname" .) .Values.suggestion.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.suggestion.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The one image every component runs: [<registry>/]<repository>:<tag>. */}}
{{- define "kubetune.image" -}}
{{- $repository := .Values.image.repository }}
{{- with .Values.image.registry }}
{{- $repository = printf "%s/%s" (trimSuffix "/" .) $repository }}
{{- end }}
{{- printf "%s:%s" $repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The suggestion service's in-cluster URL, handed to the operator (and by it to every sidecar). */}}
{{- define "kubetune.suggestion.url" -}}
{{- printf "http://%s.%s.svc:%d" (include "kubetune.suggestion.fullname" .) .Release.Namespace (int .Values.suggestion.port) }}
{{- end }}

{{/* Secret holding the per-trial token key. */}}
{{/* The users whose ServiceAccount tokens may make every call of the service. */}}
{{- define "kubetune.serviceUsers" -}}
{{- $op := printf "system:serviceaccount:%s:%s" .Release.Namespace (include "kubetune.operator.serviceAccountName" .) }}
{{- join "," (concat (list $op) .Values.suggestion.auth.extraUsers) }}
{{- end }}

{{- define "kubetune.tokenSecretName" -}}
{{- default (include "kubetune.componentName" (list . "token")) .Values.suggestion.tokenSecret.existingSecret }}
{{- end }}

{{/* Whether the service uses SQLite on a volume (no external database configured). */}}
{{- define "kubetune.sqlite" -}}
{{- if not .Values.database.external.existingSecret }}true{{- end }}
{{- end }}
