{{/* Chart name and labels. */}}
{{- define "zq-csi.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "zq-csi.labels" -}}
app.kubernetes.io/name: {{ include "zq-csi.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "zq-csi.selectorLabels" -}}
app.kubernetes.io/name: {{ include "zq-csi.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Object name prefix: the release name, unless it already holds the chart name. */}}
{{- define "zq-csi.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "zq-csi.controllerServiceAccount" -}}
{{- default (printf "%s-controller" (include "zq-csi.fullname" .)) .Values.controller.serviceAccount.name -}}
{{- end -}}

{{- define "zq-csi.nodeServiceAccount" -}}
{{- default (printf "%s-node" (include "zq-csi.fullname" .)) .Values.node.serviceAccount.name -}}
{{- end -}}

{{/* image: {repository, tag, pullPolicy} -> "repository:tag" */}}
{{- define "zq-csi.image" -}}
{{- printf "%s:%s" .repository (toString .tag) -}}
{{- end -}}

{{- define "zq-csi.driverImage" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* The sidecars' API server address for clusters without a Service network. */}}
{{- define "zq-csi.apiServerEnv" -}}
{{- if .Values.kubernetesServiceHost }}
- name: KUBERNETES_SERVICE_HOST
  value: {{ .Values.kubernetesServiceHost | quote }}
{{- end }}
{{- if .Values.kubernetesServicePort }}
- name: KUBERNETES_SERVICE_PORT
  value: {{ .Values.kubernetesServicePort | quote }}
{{- end }}
{{- end -}}

{{/* The plugin's socket directory under the kubelet directory. */}}
{{- define "zq-csi.pluginDir" -}}
{{- printf "%s/plugins/%s" (trimSuffix "/" .Values.kubeletDir) .Values.driverName -}}
{{- end -}}
