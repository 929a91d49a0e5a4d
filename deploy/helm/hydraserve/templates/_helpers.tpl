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

{{/* A restricted pod security context (Pod Security Standards "restricted", with the
container context below): non-root user from podSecurity, RuntimeDefault seccomp. */}}
{{- define "hydraserve.podSecurity" -}}
{{- if not (gt (int .Values.podSecurity.runAsUser) 0) -}}
{{- fail "podSecurity.runAsUser must be a non-zero user id (the restricted Pod Security level forbids root)" -}}
{{- end -}}
securityContext:
  runAsNonRoot: true
  runAsUser: {{ .Values.podSecurity.runAsUser }}
  runAsGroup: {{ .Values.podSecurity.runAsGroup }}
  seccompProfile:
    type: RuntimeDefault
{{- end -}}

{{/* A restricted container security context: no privilege escalation, no capabilities,
read-only root filesystem (writable paths are emptyDir volumes). */}}
{{- define "hydraserve.containerSecurity" -}}
securityContext:
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  runAsNonRoot: true
  capabilities:
    drop: ["ALL"]
  seccompProfile:
    type: RuntimeDefault
{{- end -}}

{{/* The labels every HydraServe worker pod carries (hydraserve/operator/naming.py:
worker_labels, MANAGED_BY and APP_NAME), as a NetworkPolicy podSelector. */}}
{{- define "hydraserve.workerPodSelector" -}}
podSelector:
  matchLabels:
    app.kubernetes.io/managed-by: hydraserve-operator
    app.kubernetes.io/name: hydraserve-worker
{{- end -}}

{{/* The namespaces worker pods live in: the watched ones, or all. */}}
{{- define "hydraserve.workerNamespaceSelector" -}}
{{- if .Values.operator.watchNamespaces }}
namespaceSelector:
  matchExpressions:
    - key: kubernetes.io/metadata.name
      operator: In
      values:
        {{- toYaml .Values.operator.watchNamespaces | nindent 8 }}
{{- else }}
namespaceSelector: {}
{{- end }}
{{- end -}}

{{- define "hydraserve.prefetcherLabels" -}}
{{- include "hydraserve.selectorLabels" (dict "ctx" . "component" "prefetcher") -}}
{{- end -}}

{{/* A NetworkPolicy peer: worker pods in the namespaces they live in. */}}
{{- define "hydraserve.workerPeer" -}}
- {{ include "hydraserve.workerNamespaceSelector" . | trim | nindent 2 | trim }}
  {{- include "hydraserve.workerPodSelector" . | nindent 2 }}
{{- end -}}

{{/* An egress rule to TCP ports, at some CIDRs or anywhere: (dict "cidrs" [...] "ports" [...]). */}}
{{- define "hydraserve.egressTo" -}}
- ports:
    {{- range .ports }}
    - protocol: TCP
      port: {{ . }}
    {{- end }}
  {{- with .cidrs }}
  to:
    {{- range . }}
    - ipBlock:
        cidr: {{ . }}
    {{- end }}
  {{- end }}
{{- end -}}

{{/* The egress rule to the cluster DNS (UDP and TCP). */}}
{{- define "hydraserve.dnsEgress" -}}
- to:
    {{- toYaml .Values.networkPolicy.dns.to | nindent 4 }}
  ports:
    {{- range .Values.networkPolicy.dns.ports }}
    - protocol: UDP
      port: {{ . }}
    - protocol: TCP
      port: {{ . }}
    {{- end }}
{{- end -}}
