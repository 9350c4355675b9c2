{{/*
Redis shared by every replica (redis.url or redis.existingSecret): whether it is on, the Secret
holding its URL (the one the chart creates from redis.url, or redis.existingSecret) and the key in
it. The proxy reads the URL from REDIS_URL (url_env), so the URL and its password never reach the
ConfigMap.
*/}}
{{- define "openrouter-proxy.redisEnabled" -}}
{{- if and .Values.redis.url .Values.redis.existingSecret }}{{ fail "redis: set url or existingSecret, not both" }}{{ end }}
{{- if or .Values.redis.url .Values.redis.existingSecret }}true{{ end }}
{{- end }}

{{- define "openrouter-proxy.redisSecretName" -}}
{{- if .Values.redis.existingSecret }}{{ .Values.redis.existingSecret }}{{ else }}{{ include "openrouter-proxy.fullname" . }}-redis{{ end }}
{{- end }}

{{- define "openrouter-proxy.redisSecretKey" -}}
{{- if .Values.redis.existingSecret }}{{ .Values.redis.existingSecretKey }}{{ else }}url{{ end }}
{{- end }}

{{/* The env entry that carries the URL, as one item of a container's env list. */}}
{{- define "openrouter-proxy.redisEnv" -}}
- name: REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "openrouter-proxy.redisSecretName" . }}
      key: {{ include "openrouter-proxy.redisSecretKey" . }}
      optional: false
{{- end }}

{{/*
Lays [redis] into the config dict `cfg` (a copy of .Values.config): url_env = "REDIS_URL" next to
the tuning keys of config.redis, and cache.tier2 = "redis" unless redis.cacheTier2 is false or
config.cache.tier2 says otherwise. Call with (dict "root" $ "cfg" $cfg).
*/}}
{{- define "openrouter-proxy.redisConfig" -}}
{{- $cfg := .cfg }}
{{- if include "openrouter-proxy.redisEnabled" .root }}
{{- $section := $cfg.redis | default dict }}
{{- $_ := set $section "url_env" "REDIS_URL" }}
{{- $_ = set $cfg "redis" $section }}
{{- $cache := $cfg.cache | default dict }}
{{- if and .root.Values.redis.cacheTier2 (not (hasKey $cache "tier2")) }}
{{- $_ = set $cache "tier2" "redis" }}
{{- end }}
{{- $_ = set $cfg "cache" $cache }}
{{- else if $cfg.redis }}
{{- fail "config.redis needs redis.url or redis.existingSecret (the URL comes from a Secret)" }}
{{- end }}
{{- end }}
