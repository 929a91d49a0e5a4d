{{/* Names, labels and images shared by the templates. */}}

{{- define "hydraserve.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "hydraserve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/part-of: hydraserve
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}

{{/* selectorLabels: (dict "ctx" $ "component" "operator") */}}
{{- define "hydraserve.selectorLabels" -}}
app.kubernetes.io/name: hydraserve
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "hydraserve.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "hydraserve.workerImage" -}}
{{- printf "%s:%s" .Values.worker.image.repository (default .Chart.AppVersion .Values.worker.image.tag) -}}
{{- end -}}

{{/* Environment for reaching the model store. */}}
{{- define "hydraserve.s3Env" -}}
{{- if .Values.s3.endpointUrl }}
- name: HYDRASERVE_S3__ENDPOINT_URL
  value: {{ .Values.s3.endpointUrl | quote }}
{{- end }}
- name: HYDRASERVE_S3__REGION
  value: {{ .Values.s3.region | quote }}
- name: AWS_DEFAULT_REGION
  value: {{ .Values.s3.region | quote }}
{{- end -}}

{{- define "hydraserve.s3EnvFrom" -}}
{{- if .Values.s3.credentialsSecret }}
envFrom:
  - secretRef:
      name: {{ .Values.s3.credentialsSecret }}
      optional: true
{{- end }}
{{- end -}}

{{/* A restricted container security context (non-root, no privileges, read-only root). */}}
{{- define "hydraserve.containerSecurity" -}}
securityContext:
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  runAsNonRoot: true
  runAsUser: 10001
  runAsGroup: 10001
  capabilities:
    drop: ["ALL"]
  seccompProfile:
    type: RuntimeDefault
{{- end -}}

{{- define "hydraserve.prefetcherLabels" -}}
{{- include "hydraserve.selectorLabels" (dict "ctx" . "component" "prefetcher") -}}
{{- end -}}
