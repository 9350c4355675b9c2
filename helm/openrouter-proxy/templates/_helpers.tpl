{{/*
Names. The chart name is spelled out rather than read from .Chart, so the names come out the same
when the templates are included from a parent chart's context.
*/}}
{{- define "openrouter-proxy.name" -}}
{{- default "openrouter-proxy" .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "openrouter-proxy.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := include "openrouter-proxy.name" . }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "openrouter-proxy.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "openrouter-proxy.labels" -}}
helm.sh/chart: {{ include "openrouter-proxy.chart" . }}
{{ include "openrouter-proxy.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "openrouter-proxy.selectorLabels" -}}
app.kubernetes.io/name: {{ include "openrouter-proxy.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "openrouter-proxy.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "openrouter-proxy.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* "true" when the chart renders the application's Deployment with the proxy as its sidecar. */}}
{{- define "openrouter-proxy.isSidecar" -}}
{{- if .Values.app.image.repository }}true{{ end }}
{{- end }}

{{/* "true" when the proxy shares a pod with an application, here or in a parent chart. */}}
{{- define "openrouter-proxy.inAppPod" -}}
{{- if or .Values.app.image.repository (not .Values.workload.enabled) }}true{{ end }}
{{- end }}

{{- define "openrouter-proxy.configMapName" -}}
{{- printf "%s-config" (include "openrouter-proxy.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "openrouter-proxy.secretName" -}}
{{- if .Values.existingSecret }}
{{- .Values.existingSecret }}
{{- else }}
{{- include "openrouter-proxy.fullname" . }}
{{- end }}
{{- end }}

{{- define "openrouter-proxy.secretKey" -}}
{{- if .Values.existingSecret }}{{ .Values.existingSecretKey }}{{ else }}api-key{{ end }}
{{- end }}

{{/* No key was given: the Secret is referenced as optional so the pod starts (and stays unready). */}}
{{- define "openrouter-proxy.secretOptional" -}}
{{- if and (not .Values.apiKey) (not .Values.apiKeys) (not .Values.existingSecret) }}true{{ else }}false{{ end }}
{{- end }}

{{- define "openrouter-proxy.configDir" -}}/etc/openrouter-proxy{{- end }}
{{- define "openrouter-proxy.secretDir" -}}/var/run/secrets/openrouter{{- end }}
{{- define "openrouter-proxy.upstreamSecretDir" -}}/var/run/secrets/openrouter-upstreams{{- end }}

{{/*
The upstreams with keys in Secrets, sorted by name, as a JSON list of {name, secret, dir, keys,
volume, create}: the Secret (existingSecret, or one the chart creates from apiKeys), where it is
mounted, its keys as [{name, secretKey, weight}] (one "api-key" by default), and its volume name.
*/}}
{{- define "openrouter-proxy.upstreamSecrets" -}}
{{- $out := list }}
{{- $secrets := .Values.upstreamSecrets | default dict }}
{{- range $i, $name := keys $secrets | sortAlpha }}
{{- $entry := index $secrets $name | default dict }}
{{- $secret := $entry.existingSecret }}
{{- if not $secret }}
{{- $secret = printf "%s-%s" (include "openrouter-proxy.fullname" $) ($name | lower | replace "_" "-" | replace "." "-") | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- $keys := $entry.keys | default (list (dict "secretKey" "api-key")) }}
{{- $out = append $out (dict "name" $name "secret" $secret "dir" (printf "%s/%s" (include "openrouter-proxy.upstreamSecretDir" $) $name) "keys" $keys "volume" (printf "openrouter-proxy-upstream-%d" $i) "create" (and (not $entry.existingSecret) $entry.apiKeys) "apiKeys" ($entry.apiKeys | default dict)) }}
{{- end }}
{{- toJson $out }}
{{- end }}

{{/* keys = [...] of proxy.toml for `keys` ([{name, secretKey, weight}]) mounted under `dir`. */}}
{{- define "openrouter-proxy.keyFiles" -}}
{{- $out := list }}
{{- range .keys }}
{{- $key := dict "name" (.name | default .secretKey) "file" (printf "%s/%s" $.dir .secretKey) }}
{{- if .weight }}{{ $_ := set $key "weight" .weight }}{{ end }}
{{- $out = append $out $key }}
{{- end }}
{{- toJson $out }}
{{- end }}

{{- define "openrouter-proxy.image" -}}
{{- $tag := .Values.image.tag }}
{{- if not $tag }}
{{- $tag = .Chart.AppVersion }}
{{- end }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}

{{/*
Seconds in a duration string of the forms the schema allows ("30s", "1m30s", "500ms"),
rounded up to whole seconds.
*/}}
{{- define "openrouter-proxy.durationSeconds" -}}
{{- $ms := 0 }}
{{- range regexFindAll "[0-9]+(ms|h|m|s)" (toString .) -1 }}
{{- $n := regexFind "^[0-9]+" . | int }}
{{- if hasSuffix "ms" . }}{{ $ms = add $ms $n }}
{{- else if hasSuffix "h" . }}{{ $ms = add $ms (mul $n 3600000) }}
{{- else if hasSuffix "m" . }}{{ $ms = add $ms (mul $n 60000) }}
{{- else }}{{ $ms = add $ms (mul $n 1000) }}
{{- end }}
{{- end }}
{{- div (add $ms 999) 1000 }}
{{- end }}

{{- define "openrouter-proxy.terminationGracePeriodSeconds" -}}
{{- $server := .Values.config.server | default dict }}
{{- $grace := include "openrouter-proxy.durationSeconds" ($server.shutdown_grace | default "30s") | int }}
{{- $drain := include "openrouter-proxy.durationSeconds" ($server.drain_delay | default "5s") | int }}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds }}
{{- add $drain $grace 10 }}
{{- else if le (int .Values.terminationGracePeriodSeconds) (add $drain $grace) }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must exceed drain_delay + shutdown_grace (%d seconds)" (int .Values.terminationGracePeriodSeconds) (add $drain $grace)) }}
{{- else }}
{{- .Values.terminationGracePeriodSeconds }}
{{- end }}
{{- end }}

{{/*
TOML rendering. Helm reads numbers in values as floats, so whole numbers are printed as integers;
strings are JSON-quoted, which is also a valid TOML basic string.
*/}}
{{- define "openrouter-proxy.tomlKey" -}}
{{- if regexMatch "^[A-Za-z0-9_-]+$" . }}{{ . }}{{ else }}{{ toJson . }}{{ end }}
{{- end }}

{{- define "openrouter-proxy.tomlValue" -}}
{{- $v := . }}
{{- if kindIs "string" $v }}{{ toJson $v }}
{{- else if kindIs "bool" $v }}{{ $v }}
{{- else if or (kindIs "float64" $v) (kindIs "int64" $v) (kindIs "int" $v) }}
{{- if eq (float64 $v) (float64 (int64 $v)) }}{{ int64 $v }}{{ else }}{{ $v }}{{ end }}
{{- else if kindIs "slice" $v }}[{{ range $i, $e := $v }}{{ if $i }}, {{ end }}{{ include "openrouter-proxy.tomlValue" $e }}{{ end }}]
{{- else if and (kindIs "map" $v) (not $v) }}{}
{{- else if kindIs "map" $v }}{ {{- range $i, $k := keys $v | sortAlpha }}{{ if $i }},{{ end }} {{ include "openrouter-proxy.tomlKey" $k }} = {{ include "openrouter-proxy.tomlValue" (index $v $k) }}{{ end }} }
{{- else }}{{ fail (printf "proxy.toml: cannot render %v (%s)" $v (kindOf $v)) }}
{{- end }}
{{- end }}

{{/* One table body: "key = value" lines, nested tables as inline tables. */}}
{{- define "openrouter-proxy.tomlBody" -}}
{{- range $k := keys . | sortAlpha }}
{{- $v := index $ $k }}
{{- if not (kindIs "invalid" $v) }}
{{ include "openrouter-proxy.tomlKey" $k }} = {{ include "openrouter-proxy.tomlValue" $v }}
{{- end }}
{{- end }}
{{- end }}

{{/* The structured `config` values with the keys the chart owns filled in. */}}
{{- define "openrouter-proxy.configData" -}}
{{- $cfg := deepCopy (.Values.config | default dict) }}
{{- $bind := "0.0.0.0" }}
{{- if include "openrouter-proxy.inAppPod" . }}{{ $bind = "127.0.0.1" }}{{ end }}
{{- $server := $cfg.server | default dict }}
{{- $_ := set $server "listen" (printf "%s:%d" $bind (int .Values.ports.http)) }}
{{- $_ = set $server "admin_listen" (printf "0.0.0.0:%d" (int .Values.ports.admin)) }}
{{- /* A shared gateway uses every core it is given; a sidecar keeps the proxy's one thread. */}}
{{- if and (not (include "openrouter-proxy.inAppPod" .)) (not (hasKey $server "worker_threads")) }}
{{- $_ = set $server "worker_threads" 0 }}
{{- end }}
{{- $_ = set $cfg "server" $server }}
{{- $upstream := $cfg.upstream | default dict }}
{{- /* The chart's default base_url gives way to endpoints. */}}
{{- if $upstream.endpoints }}{{ $_ = unset $upstream "base_url" }}{{ end }}
{{- if .Values.keyPool }}
{{- if $upstream.keys }}{{ fail "set keyPool or config.upstream.keys, not both" }}{{ end }}
{{- if ne .Values.apiKeySource "file" }}{{ fail "keyPool needs apiKeySource: file (each key is a file of the Secret)" }}{{ end }}
{{- $pool := dict "keys" .Values.keyPool "dir" (include "openrouter-proxy.secretDir" .) }}
{{- $_ = set $upstream "keys" (include "openrouter-proxy.keyFiles" $pool | fromJsonArray) }}
{{- else if $upstream.keys }}
{{- /* A pool of the user's own (keys from variables set in `env`): left as it is. */}}
{{- else if eq .Values.apiKeySource "file" }}
{{- $_ = set $upstream "api_key_file" (printf "%s/api-key" (include "openrouter-proxy.secretDir" .)) }}
{{- else }}
{{- $_ = set $upstream "api_key_env" "OPENROUTER_API_KEY" }}
{{- end }}
{{- $_ = set $cfg "upstream" $upstream }}
{{- $upstreams := $cfg.upstreams | default dict }}
{{- range $entry := include "openrouter-proxy.upstreamSecrets" . | fromJsonArray }}
{{- if not (hasKey $upstreams $entry.name) }}
{{- fail (printf "upstreamSecrets.%s: config.upstreams has no upstream named %s" $entry.name $entry.name) }}
{{- end }}
{{- $section := index $upstreams $entry.name | default dict }}
{{- $only := index $entry.keys 0 }}
{{- if and (eq (len $entry.keys) 1) (not $only.name) (not $only.weight) }}
{{- $_ = set $section "api_key_file" (printf "%s/%s" $entry.dir $only.secretKey) }}
{{- else }}
{{- $_ = set $section "keys" (include "openrouter-proxy.keyFiles" $entry | fromJsonArray) }}
{{- end }}
{{- $_ = set $upstreams $entry.name $section }}
{{- end }}
{{- $_ = set $cfg "upstreams" $upstreams }}
{{- if .Values.batch.enabled }}
{{- $batch := $cfg.batch | default dict }}
{{- $_ = set $batch "store" .Values.batch.mountPath }}
{{- $_ = set $cfg "batch" $batch }}
{{- else }}
{{- $_ = unset $cfg "batch" }}
{{- end }}
{{- include "openrouter-proxy.redisConfig" (dict "root" . "cfg" $cfg) }}
{{- with .Values.otel }}{{ if .enabled }}
{{- $otel := $cfg.otel | default dict }}
{{- $_ = set $otel "endpoint" .endpoint }}
{{- $_ = set $otel "sample_ratio" .sampleRatio }}
{{- $_ = set $otel "service_name" .serviceName }}
{{- $_ = set $otel "capture_content" .captureContent }}
{{- $_ = set $cfg "otel" $otel }}
{{- end }}{{ end }}
{{- toJson $cfg }}
{{- end }}

{{- define "openrouter-proxy.proxyToml" -}}
{{- if .Values.rawConfig }}
{{- .Values.rawConfig }}
{{- else }}
{{- $cfg := include "openrouter-proxy.configData" . | fromJson }}
{{- $tables := list "server" "upstream" "fallback" "cache" "log" }}
{{- range $k := keys $cfg | sortAlpha }}
{{- if not (or (has $k $tables) (eq $k "routes") (eq $k "upstreams")) }}{{ $tables = append $tables $k }}{{ end }}
{{- end -}}
# proxy.toml rendered by the openrouter-proxy chart from its `config` values.
{{- range $t := $tables }}
{{- $body := index $cfg $t }}
{{- if $body }}

[{{ $t }}]
{{- include "openrouter-proxy.tomlBody" $body }}
{{- end }}
{{- end }}
{{- $upstreams := $cfg.upstreams | default dict }}
{{- range $name := keys $upstreams | sortAlpha }}

[upstreams.{{ include "openrouter-proxy.tomlKey" $name }}]
{{- include "openrouter-proxy.tomlBody" (index $upstreams $name | default dict) }}
{{- end }}
{{- range $route := $cfg.routes | default list }}

[[routes]]
{{- include "openrouter-proxy.tomlBody" $route }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The proxy container, as one item of a containers or initContainers list. Include it with the
chart's context, from a parent chart: (index .Subcharts "openrouter-proxy").
With sidecar.native it carries restartPolicy: Always and belongs in initContainers.
*/}}
{{- define "openrouter-proxy.sidecar" -}}
- name: openrouter-proxy
  image: {{ include "openrouter-proxy.image" . | quote }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  {{- if and .Values.sidecar.native (include "openrouter-proxy.inAppPod" .) }}
  restartPolicy: Always
  {{- end }}
  args:
    - --config
    - {{ include "openrouter-proxy.configDir" . }}/proxy.toml
  ports:
    - name: http
      containerPort: {{ .Values.ports.http }}
      protocol: TCP
    - name: admin
      containerPort: {{ .Values.ports.admin }}
      protocol: TCP
  {{- $traced := and .Values.otel.enabled (not .Values.rawConfig) }}
  {{- if or (eq .Values.apiKeySource "env") .Values.env (include "openrouter-proxy.redisEnabled" .) $traced }}
  env:
    {{- if include "openrouter-proxy.redisEnabled" . }}
    {{- include "openrouter-proxy.redisEnv" . | nindent 4 }}
    {{- end }}
    {{- if eq .Values.apiKeySource "env" }}
    - name: OPENROUTER_API_KEY
      valueFrom:
        secretKeyRef:
          name: {{ include "openrouter-proxy.secretName" . }}
          key: {{ include "openrouter-proxy.secretKey" . }}
          optional: {{ include "openrouter-proxy.secretOptional" . }}
    {{- end }}
    {{- if $traced }}
    {{- include "openrouter-proxy.otelEnv" . | nindent 4 }}
    {{- end }}
    {{- with .Values.env }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- end }}
  startupProbe:
    httpGet:
      path: /healthz
      port: admin
    periodSeconds: {{ .Values.probes.startup.periodSeconds }}
    failureThreshold: {{ .Values.probes.startup.failureThreshold }}
  livenessProbe:
    httpGet:
      path: /healthz
      port: admin
    periodSeconds: {{ .Values.probes.liveness.periodSeconds }}
    timeoutSeconds: {{ .Values.probes.liveness.timeoutSeconds }}
    failureThreshold: {{ .Values.probes.liveness.failureThreshold }}
  readinessProbe:
    httpGet:
      path: /readyz
      port: admin
    periodSeconds: {{ .Values.probes.readiness.periodSeconds }}
    timeoutSeconds: {{ .Values.probes.readiness.timeoutSeconds }}
    failureThreshold: {{ .Values.probes.readiness.failureThreshold }}
  {{- with .Values.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.securityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  volumeMounts:
    - name: openrouter-proxy-config
      mountPath: {{ include "openrouter-proxy.configDir" . }}
      readOnly: true
    {{- if eq .Values.apiKeySource "file" }}
    - name: openrouter-proxy-api-key
      mountPath: {{ include "openrouter-proxy.secretDir" . }}
      readOnly: true
    {{- end }}
    {{- range include "openrouter-proxy.upstreamSecrets" . | fromJsonArray }}
    - name: {{ .volume }}
      mountPath: {{ .dir }}
      readOnly: true
    {{- end }}
    {{- if .Values.batch.enabled }}
    - name: openrouter-proxy-batches
      mountPath: {{ .Values.batch.mountPath }}
    {{- end }}
{{- end }}

{{/*
The proxy's volumes, as items of a pod's volumes list. Both are mounted as directories (never
subPath) so ConfigMap and Secret updates reach the running proxy.
*/}}
{{- define "openrouter-proxy.sidecarVolumes" -}}
- name: openrouter-proxy-config
  configMap:
    name: {{ include "openrouter-proxy.configMapName" . }}
{{- if eq .Values.apiKeySource "file" }}
- name: openrouter-proxy-api-key
  secret:
    secretName: {{ include "openrouter-proxy.secretName" . }}
    optional: {{ include "openrouter-proxy.secretOptional" . }}
    items:
      {{- range .Values.keyPool }}
      - key: {{ .secretKey }}
        path: {{ .secretKey }}
      {{- else }}
      - key: {{ include "openrouter-proxy.secretKey" . }}
        path: api-key
      {{- end }}
{{- end }}
{{- range include "openrouter-proxy.upstreamSecrets" . | fromJsonArray }}
- name: {{ .volume }}
  secret:
    secretName: {{ .secret }}
    items:
      {{- range .keys }}
      - key: {{ .secretKey }}
        path: {{ .secretKey }}
      {{- end }}
{{- end }}
{{- if .Values.batch.enabled }}
- name: openrouter-proxy-batches
  {{- if include "openrouter-proxy.batchClaim" . }}
  persistentVolumeClaim:
    claimName: {{ include "openrouter-proxy.batchClaim" . }}
  {{- else if .Values.batch.emptyDir.sizeLimit }}
  emptyDir:
    sizeLimit: {{ .Values.batch.emptyDir.sizeLimit }}
  {{- else }}
  emptyDir: {}
  {{- end }}
{{- end }}
{{- end }}

{{/*
The claim holding the batch store: batch.persistence in the standalone shape (the claim the chart
creates, or batch.persistence.existingClaim); empty otherwise (an emptyDir). A store has one
writer, so persistence refuses more than one replica. With redis.url or redis.existingSecret the
store is Redis, shared by every replica: no claim, and any replica count.
*/}}
{{- define "openrouter-proxy.batchClaim" -}}
{{- $persist := .Values.batch.persistence }}
{{- $onRedis := or .Values.redis.url .Values.redis.existingSecret }}
{{- if and .Values.batch.enabled $persist.enabled (not $onRedis) }}
{{- if include "openrouter-proxy.inAppPod" . }}
{{- fail "batch.persistence is for the standalone shape; a sidecar's store is an emptyDir (see batch.emptyDir)" }}
{{- end }}
{{- if or .Values.autoscaling.enabled (gt (int .Values.replicaCount) 1) }}
{{- fail "batch.persistence needs replicaCount: 1 and autoscaling.enabled: false (the batch store has one writer)" }}
{{- end }}
{{- $persist.existingClaim | default (printf "%s-batches" (include "openrouter-proxy.fullname" .)) }}
{{- end }}
{{- end }}

{{/*
Environment for the application container: OpenAI SDKs read OPENAI_BASE_URL, and need some
OPENAI_API_KEY even though the proxy replaces it with the real key.
*/}}
{{- define "openrouter-proxy.appEnv" -}}
- name: OPENAI_BASE_URL
  value: {{ printf "http://127.0.0.1:%d/v1" (int .Values.ports.http) | quote }}
- name: OPENAI_API_KEY
  value: unused
{{- end }}

{{/* Selector of the rendered workload's pods: the proxy alone, or the application with it. */}}
{{- define "openrouter-proxy.workloadSelectorLabels" -}}
{{ include "openrouter-proxy.selectorLabels" . }}
app.kubernetes.io/component: {{ if include "openrouter-proxy.isSidecar" . }}app{{ else }}proxy{{ end }}
{{- end }}

{{/* The pod's identity on every span: OTEL_RESOURCE_ATTRIBUTES from the downward API. */}}
{{- define "openrouter-proxy.otelEnv" -}}
{{- $attributes := list "k8s.pod.name=$(OTEL_K8S_POD_NAME)" "k8s.namespace.name=$(OTEL_K8S_NAMESPACE)" }}
{{- range $k := keys .Values.otel.resourceAttributes | sortAlpha }}
{{- $attributes = append $attributes (printf "%s=%s" $k (index $.Values.otel.resourceAttributes $k | toString)) }}
{{- end -}}
- name: OTEL_K8S_POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: OTEL_K8S_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: OTEL_RESOURCE_ATTRIBUTES
  value: {{ join "," $attributes | quote }}
{{- end }}
