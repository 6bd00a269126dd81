{{/* Chart name, truncated to a DNS label. */}}
{{- define "dino-ctl.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Release-qualified name: the release name alone when it already contains the chart name. */}}
{{- define "dino-ctl.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "dino-ctl.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dino-ctl.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: controller
{{- end -}}

{{- define "dino-ctl.labels" -}}
app.kubernetes.io/name: {{ include "dino-ctl.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* Labels of monitoring objects: the common labels plus the Prometheus selector labels. */}}
{{- define "dino-ctl.monitoringLabels" -}}
{{ include "dino-ctl.labels" . }}
{{- with .Values.monitoring.labels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "dino-ctl.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "dino-ctl.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The watched namespaces as a list (the release namespace when none are given). */}}
{{- define "dino-ctl.watchNamespaces" -}}
{{- toJson (default (list .Release.Namespace) .Values.watchNamespaces) -}}
{{- end -}}

{{- define "dino-ctl.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
