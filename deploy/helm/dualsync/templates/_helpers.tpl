{{/* Names: <release>-dualsync unless the release name already says dualsync. */}}
{{- define "dualsync.fullname" -}}
{{- if contains "dualsync" .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-dualsync" .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "dualsync.selectorLabels" -}}
app.kubernetes.io/name: dualsync
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "dualsync.labels" -}}
{{ include "dualsync.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "dualsync.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* One env entry from a Secret: (dict "env" NAME "ref" {name, key}). */}}
{{- define "dualsync.secretEnv" -}}
- name: {{ .env }}
  valueFrom:
    secretKeyRef:
      name: {{ required (printf "%s: the Secret's name" .env) .ref.name }}
      key: {{ required (printf "%s: the key in Secret %s" .env .ref.name) .ref.key }}
{{- end -}}

{{/*
The environment of every relay and apply container: the secrets as DUALSYNC_* overrides
(docs/operations.md), the HTTP endpoint, the schemas folder, then extraEnv.
*/}}
{{- define "dualsync.env" -}}
{{- $s := .Values.secrets -}}
{{- if and $s.source $s.source.name }}
{{ include "dualsync.secretEnv" (dict "env" "DUALSYNC_SOURCE__URL" "ref" $s.source) }}
{{- end }}
{{- range .Values.sinks }}
{{- if and .urlSecret .urlSecret.name }}
{{ include "dualsync.secretEnv" (dict "env" (printf "DUALSYNC_SINKS__%s__URL" (upper .name)) "ref" .urlSecret) }}
{{- end }}
{{- end }}
{{- range $property, $ref := $s.kafkaProperties }}
{{ include "dualsync.secretEnv" (dict "env" (printf "DUALSYNC_KAFKA__PROPERTIES__%s" ($property | replace "." "_" | upper)) "ref" $ref) }}
{{- end }}
{{- with $s.httpToken }}
{{- if .name }}
{{ include "dualsync.secretEnv" (dict "env" (.env | default "DUALSYNC_HTTP_TOKEN") "ref" .) }}
{{- end }}
{{- end }}
{{- with $s.schemaRegistryPassword }}
{{- if .name }}
{{ include "dualsync.secretEnv" (dict "env" (required "secrets.schemaRegistryPassword.env: the variable schema_registry.password_env names" .env) "ref" .) }}
{{- end }}
{{- end }}
- name: DUALSYNC_HTTP__ENABLED
  value: "true"
- name: DUALSYNC_HTTP__HOST
  value: {{ .Values.http.host | quote }}
- name: DUALSYNC_HTTP__RELAY_PORT
  value: {{ .Values.http.relayPort | int | quote }}
- name: DUALSYNC_HTTP__APPLY_PORT
  value: {{ .Values.http.applyPort | int | quote }}
{{- if .Values.schemasConfigMap }}
- name: DUALSYNC_ENCODING__SCHEMAS_DIR
  value: /etc/dualsync/schemas
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
The pod spec shared by relay and apply: (dict "root" $ "component" NAME "args" LIST
"port" PORT "resources" MAP "pod" VALUES-OF-THE-COMPONENT "affinity" MAP). The pipeline file
is the ConfigMap's pipeline.toml at /etc/dualsync/config/pipeline.toml.
*/}}
{{- define "dualsync.podSpec" -}}
{{- $root := .root -}}
{{- with $root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
terminationGracePeriodSeconds: {{ $root.Values.terminationGracePeriodSeconds }}
securityContext:
  {{- toYaml $root.Values.podSecurityContext | nindent 2 }}
containers:
  - name: {{ .component }}
    image: {{ include "dualsync.image" $root }}
    imagePullPolicy: {{ $root.Values.image.pullPolicy }}
    args:
      {{- toYaml (concat (list "--log-format" $root.Values.logFormat) .args (list "--config" "/etc/dualsync/config/pipeline.toml")) | nindent 6 }}
    env:
      {{- include "dualsync.env" $root | trim | nindent 6 }}
    ports:
      - name: http
        containerPort: {{ .port }}
    livenessProbe:
      httpGet:
        path: /healthz
        port: http
      {{- toYaml $root.Values.livenessProbe | nindent 6 }}
    readinessProbe:
      httpGet:
        path: /readyz
        port: http
      {{- toYaml $root.Values.readinessProbe | nindent 6 }}
    resources:
      {{- toYaml .resources | nindent 6 }}
    securityContext:
      {{- toYaml $root.Values.securityContext | nindent 6 }}
    volumeMounts:
      - name: config
        mountPath: /etc/dualsync/config
        readOnly: true
      {{- if $root.Values.schemasConfigMap }}
      - name: schemas
        mountPath: /etc/dualsync/schemas
        readOnly: true
      {{- end }}
volumes:
  - name: config
    configMap:
      name: {{ include "dualsync.fullname" $root }}
  {{- if $root.Values.schemasConfigMap }}
  - name: schemas
    configMap:
      name: {{ $root.Values.schemasConfigMap }}
  {{- end }}
{{- with .pod.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .pod.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}
