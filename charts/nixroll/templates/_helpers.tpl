{{/*
Named templates of the chart. Object names are fixed (nixroll-controller, nixroll-agent, the
Lease, the pause ConfigMap): the code and the admission policy use them, and one cluster runs
one nixroll, so there is no nameOverride/fullnameOverride.
*/}}

{{/*
The release namespace, which must be nixroll-system: the controller reads its Lease, the pause
switch and FlakeSource Secrets there and the agents read spec.secrets there (DESIGN.md, the
fixed namespace). Any other namespace fails the render instead of installing a nixroll that
cannot find its own objects.
*/}}
{{- define "nixroll.namespace" -}}
{{- if ne .Release.Namespace "nixroll-system" -}}
{{- fail (printf "nixroll must be installed in the namespace nixroll-system, not %s (the controller and agents read the pause switch, the leader Lease and Secrets there): helm install nixroll charts/nixroll --namespace nixroll-system --create-namespace" .Release.Namespace) -}}
{{- end -}}
{{- .Release.Namespace -}}
{{- end -}}

{{/* helm.sh/chart: name-version, as `helm create` writes it. */}}
{{- define "nixroll.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
The Helm standard labels every object of the release carries besides its component's
app.kubernetes.io/name and app.kubernetes.io/part-of=nixroll, which kubectl apply -k deploy/
gives too (and so are not Helm's to add). Selectors stay
app.kubernetes.io/name alone, so moving from deploy/ to the chart never changes an immutable
selector.
*/}}
{{- define "nixroll.helmLabels" -}}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ include "nixroll.chart" . }}
{{- end -}}

{{- define "nixroll.controller.selectorLabels" -}}
app.kubernetes.io/name: nixroll-controller
{{- end -}}

{{- define "nixroll.controller.labels" -}}
{{ include "nixroll.controller.selectorLabels" . }}
app.kubernetes.io/part-of: nixroll
{{ include "nixroll.helmLabels" . }}
{{- end -}}

{{- define "nixroll.agent.selectorLabels" -}}
app.kubernetes.io/name: nixroll-agent
{{- end -}}

{{- define "nixroll.agent.labels" -}}
{{ include "nixroll.agent.selectorLabels" . }}
app.kubernetes.io/part-of: nixroll
{{ include "nixroll.helmLabels" . }}
{{- end -}}

{{/* The image of both components: the tag defaults to the chart's appVersion. */}}
{{- define "nixroll.image" -}}
{{ required "image.repository is required" .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "nixroll.controller.serviceAccountName" -}}
{{ .Values.controller.serviceAccount.name | default "nixroll-controller" }}
{{- end -}}

{{- define "nixroll.agent.serviceAccountName" -}}
{{ .Values.agent.serviceAccount.name | default "nixroll-agent" }}
{{- end -}}

{{- define "nixroll.builder.selectorLabels" -}}
app.kubernetes.io/name: nixroll-builder
{{- end -}}

{{- define "nixroll.builder.labels" -}}
{{ include "nixroll.builder.selectorLabels" . }}
app.kubernetes.io/part-of: nixroll
{{ include "nixroll.helmLabels" . }}
{{- end -}}
