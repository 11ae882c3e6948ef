{{/*
The labels of k8s/base's kustomize `labels` (metadata only, never selectors), plus
commonLabels. The overlays' own ConfigMaps (settings, routing) and k8s/monitoring's
objects do not carry them: the chart emits the same objects.
*/}}
{{- define "imagegen.labels" -}}
app.kubernetes.io/name: imagegen
app.kubernetes.io/part-of: imagegen
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
The image, pinned by content: REPOSITORY[:TAG]@sha256:<64 hex>. A tag alone never
deploys, nor the all-zero placeholder digest.
*/}}
{{- define "imagegen.image" -}}
{{- $image := .Values.image -}}
{{- $repo := required "image.repository is required (e.g. registry.example/imagegen)" $image.repository -}}
{{- $digest := required "image.digest is required: the image is pinned by digest (--set image.digest=sha256:<64 hex>), never by tag alone" $image.digest -}}
{{- if not (regexMatch "^sha256:[0-9a-f]{64}$" $digest) -}}
{{- fail (printf "image.digest %q: give sha256:<64 hex> (the image is pinned by digest)" $digest) -}}
{{- end -}}
{{- if eq $digest (printf "sha256:%s" (repeat 64 "0")) -}}
{{- fail "image.digest: the all-zero digest is a placeholder, not an image" -}}
{{- end -}}
{{- if or (contains "@" $repo) (contains ":" (last (splitList "/" $repo))) -}}
{{- fail (printf "image.repository %q: give the repository alone; the tag goes in image.tag, the digest in image.digest" $repo) -}}
{{- end -}}
{{- $repo }}{{ with $image.tag }}:{{ . }}{{ end }}@{{ $digest }}
{{- end }}

{{/* The generated part is required: `imagegen render k8s` writes it. */}}
{{- define "imagegen.serveConfig" -}}
{{- $text := required "serveConfig is required: use generated/values-<env>.yaml (imagegen render k8s --overlay <env>)" .Values.serveConfig -}}
{{- $doc := fromYaml $text -}}
{{- if or (hasKey $doc "Error") (not (hasKey $doc "applications")) -}}
{{- fail "serveConfig is not a Ray Serve config (no `applications`): render it with `imagegen render serve-config`" -}}
{{- end -}}
{{- $text -}}
{{- end }}

{{- define "imagegen.nodeCap" -}}
{{- $cap := int .Values.nodeCap -}}
{{- if lt $cap 1 -}}
{{- fail "nodeCap is required (>= 1): the policy's max_nodes; use generated/values-<env>.yaml" -}}
{{- end -}}
{{- $cap -}}
{{- end }}

{{/* envFrom and the secret-backed env of the pods that serve requests (head, cpu). */}}
{{- define "imagegen.settingsEnvFrom" -}}
- configMapRef: {name: imagegen-settings}
{{- end }}

{{- define "imagegen.servingEnv" -}}
- {name: XDG_CACHE_HOME, value: /tmp/cache}
- {name: XDG_STATE_HOME, value: /tmp/state}
- {name: HF_HUB_OFFLINE, value: "1"}
- name: IMAGEGEN_STATE_URL
  valueFrom: {secretKeyRef: {name: {{ .Values.secrets.app }}, key: state_url}}
- name: IMAGEGEN_STORAGE_SECRET
  valueFrom: {secretKeyRef: {name: {{ .Values.secrets.app }}, key: storage_secret}}
- name: IMAGEGEN_WEBHOOK_SECRET
  valueFrom: {secretKeyRef: {name: {{ .Values.secrets.app }}, key: webhook_secret}}
- name: AWS_ACCESS_KEY_ID
  valueFrom: {secretKeyRef: {name: {{ .Values.secrets.s3 }}, key: access_key_id}}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom: {secretKeyRef: {name: {{ .Values.secrets.s3 }}, key: secret_access_key}}
{{ include "imagegen.serveEnv" . }}
{{ include "imagegen.drainEnv" . }}
{{- end }}

{{/* Ray Serve's data path (values rayServe.*): throughput-optimized mode (handle
calls over gRPC, user code on each replica's event loop), with its direct ingress
off (callers reach Serve's proxies through the serve Service), gRPC messages up to
gRPC's ceiling and Serve's logs on stderr: serve/local.py SERVE_ENV. */}}
{{- define "imagegen.serveEnv" -}}
- {name: RAY_SERVE_THROUGHPUT_OPTIMIZED, value: {{ ternary "1" "0" .Values.rayServe.throughputOptimized | quote }}}
- {name: RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH, value: "2147483647"}
- {name: RAY_SERVE_LOG_TO_STDERR, value: "1"}
- {name: RAY_SERVE_ENABLE_DIRECT_INGRESS, value: "0"}
{{- end }}

{{/* How a Ray pod stops (values drain.*): Ray's node drain, and the preStop sleep. */}}
{{- define "imagegen.drainEnv" -}}
- {name: RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S, value: {{ .Values.drain.rayDrainTimeoutS | quote }}}
{{- end }}

{{- define "imagegen.lifecycle" -}}
preStop: {exec: {command: [sleep, {{ .Values.drain.preStopSleepS | quote }}]}}
{{- end }}

{{/* Mounts and volumes of the head and the cpu pods; arg: (list $ $group). */}}
{{- define "imagegen.servingMounts" -}}
- {name: tmp, mountPath: /tmp}  # Ray's session dir (/tmp/ray), caches
- {name: shm, mountPath: /dev/shm}  # Ray's object store
- {name: keys, mountPath: /etc/imagegen/keys, readOnly: true}
- {name: c2pa, mountPath: /etc/imagegen/c2pa, readOnly: true}
{{- end }}

{{- define "imagegen.servingVolumes" -}}
{{- $root := index . 0 -}}
{{- $group := index . 1 -}}
- name: tmp
  emptyDir: {sizeLimit: {{ $group.tmpSizeLimit }}}
- name: shm
  emptyDir: {medium: Memory, sizeLimit: {{ $group.shmSizeLimit }}}
- name: keys
  secret: {secretName: {{ $root.Values.secrets.keys }}, defaultMode: 0440}
- name: c2pa  # cert.pem, key.pem; optional: no C2PA until it exists
  secret: {secretName: {{ $root.Values.secrets.c2pa }}, defaultMode: 0440, optional: true}
{{- end }}
