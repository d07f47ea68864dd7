{{/* Labels Cilium's chart puts on its clustermesh-apiserver objects. */}}
{{- define "cmapi.labels" -}}
k8s-app: clustermesh-apiserver
app.kubernetes.io/part-of: cilium
app.kubernetes.io/name: clustermesh-apiserver
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/*
`metadata.annotations` (indented for metadata, with its own leading newline; nothing when
empty) from clustermesh.annotations plus an extra map that wins.
Usage: {{- include "cmapi.annotations" (list $ $extra) }}
*/}}
{{- define "cmapi.annotations" -}}
{{- $root := index . 0 -}}
{{- $extra := index . 1 | default dict -}}
{{- $all := merge (deepCopy $extra) (deepCopy ($root.Values.clustermesh.annotations | default dict)) -}}
{{- with $all }}
  annotations:
    {{- toYaml . | nindent 4 }}
{{- end }}
{{- end -}}

{{/*
An image reference from {override, repository, tag, digest, useDigest}.
Usage: include "cmapi.image" (list $ .Values.clustermesh.apiserver.image)
*/}}
{{- define "cmapi.image" -}}
{{- $root := index . 0 -}}
{{- $image := index . 1 -}}
{{- if $image.override -}}
{{- $image.override -}}
{{- else -}}
{{- $tag := $image.tag | default $root.Chart.AppVersion -}}
{{- $digest := ternary (printf "@%s" $image.digest) "" (and $image.useDigest (ne ($image.digest | default "") "")) -}}
{{- printf "%s:%s%s" $image.repository $tag $digest -}}
{{- end -}}
{{- end -}}

{{/* Refuses values the binary would refuse at start-up, at render time instead. */}}
{{- define "cmapi.validate" -}}
{{- $name := toString .Values.cluster.name -}}
{{- if not (regexMatch "^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$" $name) -}}
{{- fail (printf "cluster.name %q: at most 32 characters, lowercase alphanumerics and '-', starting and ending with an alphanumeric" $name) -}}
{{- end -}}
{{- $max := int .Values.clustermesh.maxConnectedClusters -}}
{{- if not (has $max (list 255 511)) -}}
{{- fail (printf "clustermesh.maxConnectedClusters must be 255 or 511, got %d" $max) -}}
{{- end -}}
{{- $id := int .Values.cluster.id -}}
{{- if or (lt $id 1) (gt $id $max) -}}
{{- fail (printf "cluster.id must be between 1 and %d (clustermesh.maxConnectedClusters), got %d" $max $id) -}}
{{- end -}}
{{- $tls := .Values.clustermesh.apiserver.tls -}}
{{- if not (has $tls.authMode (list "legacy" "migration" "cluster")) -}}
{{- fail "clustermesh.apiserver.tls.authMode must be one of legacy, migration, cluster" -}}
{{- end -}}
{{- if and $tls.auto.enabled (not (has $tls.auto.method (list "helm" "cronJob" "certmanager"))) -}}
{{- fail "clustermesh.apiserver.tls.auto.method must be one of helm, cronJob, certmanager" -}}
{{- end -}}
{{- if not (has .Values.clustermesh.apiserver.service.enableSessionAffinity (list "HAOnly" "Always" "Never")) -}}
{{- fail "clustermesh.apiserver.service.enableSessionAffinity must be one of HAOnly, Always, Never" -}}
{{- end -}}
{{- if not (has (toString .Values.logOptions.format) (list "text" "json")) -}}
{{- fail "logOptions.format must be text or json" -}}
{{- end -}}
{{- end -}}

{{/* Common names of the client certificates: the etcd user each one logs in as. */}}
{{- define "cmapi.admin-common-name" -}}
admin-{{ .Values.cluster.name }}
{{- end -}}

{{- define "cmapi.local-common-name" -}}
local-{{ .Values.cluster.name }}
{{- end -}}

{{- define "cmapi.remote-common-name" -}}
{{- if eq .Values.clustermesh.apiserver.tls.authMode "cluster" -}}
remote-{{ .Values.cluster.name }}
{{- else -}}
remote
{{- end -}}
{{- end -}}

{{/* DNS SANs of the server certificate (Cilium's set plus extras). */}}
{{- define "cmapi.server-dns-names" -}}
{{- $names := list "clustermesh-apiserver.cilium.io" "*.mesh.cilium.io" (printf "clustermesh-apiserver.%s.svc" .Release.Namespace) -}}
{{- toJson (concat $names (.Values.clustermesh.apiserver.tls.server.extraDnsNames | default list)) -}}
{{- end -}}

{{/* IP SANs of the server certificate. */}}
{{- define "cmapi.server-ip-addresses" -}}
{{- toJson (concat (list "127.0.0.1" "::1") (.Values.clustermesh.apiserver.tls.server.extraIpAddresses | default list)) -}}
{{- end -}}

{{/*
The CA of the helm and certmanager methods, set once per render as `.cmca` so that every
certificate is signed by the same CA. Order: inline values, the existing
`clustermesh-apiserver-ca-cert` Secret, the existing `cilium-ca` Secret, a new CA.
(`lookup` is empty under `helm template` and in Argo CD, where a new CA is made each time:
give the CA inline there.)
Usage: {{- $_ := include "cmapi.setup-ca" . -}}
*/}}
{{- define "cmapi.setup-ca" -}}
{{- if not .cmca -}}
{{- $ca := "" -}}
{{- $crt := .Values.clustermesh.apiserver.tls.ca.cert | default .Values.tls.ca.cert -}}
{{- $key := .Values.clustermesh.apiserver.tls.ca.key | default .Values.tls.ca.key -}}
{{- if and $crt $key -}}
{{- $ca = buildCustomCert $crt $key -}}
{{- else -}}
{{- $existing := lookup "v1" "Secret" .Release.Namespace "clustermesh-apiserver-ca-cert" -}}
{{- if not $existing -}}
{{- $existing = lookup "v1" "Secret" .Release.Namespace "cilium-ca" -}}
{{- end -}}
{{- if and $existing (hasKey ($existing.data | default dict) "ca.crt") (hasKey ($existing.data | default dict) "ca.key") -}}
{{- $ca = buildCustomCert (index $existing.data "ca.crt") (index $existing.data "ca.key") -}}
{{- else -}}
{{- $ca = genCA "Cilium CA" (int .Values.clustermesh.apiserver.tls.auto.certValidityDuration) -}}
{{- end -}}
{{- end -}}
{{- $_ := set . "cmca" $ca -}}
{{- end -}}
{{- end -}}

{{/*
The peers of clustermesh.config.clusters as a JSON list of {name, address, ips, port, tls},
whether the value is a list or a map keyed by name (entries with enabled: false dropped).
*/}}
{{- define "cmapi.peers" -}}
{{- $peers := list -}}
{{- $clusters := .Values.clustermesh.config.clusters | default list -}}
{{- if kindIs "map" $clusters -}}
{{- range $name := keys $clusters | sortAlpha -}}
{{- $entry := index $clusters $name | default dict -}}
{{- if ne (toString (index $entry "enabled")) "false" -}}
{{- $peers = append $peers (merge (dict "name" $name) (deepCopy $entry)) -}}
{{- end -}}
{{- end -}}
{{- else -}}
{{- range $entry := $clusters -}}
{{- $peers = append $peers $entry -}}
{{- end -}}
{{- end -}}
{{- toJson $peers -}}
{{- end -}}

{{/* Projected sources of a client or server certificate Secret plus the trusted CA. */}}
{{- define "cmapi.cert-sources" -}}
{{- $root := index . 0 -}}
{{- $secret := index . 1 -}}
- secret:
    name: {{ $secret }}
    items:
      - key: tls.crt
        path: tls.crt
      - key: tls.key
        path: tls.key
      {{- if not $root.Values.tls.caBundle.enabled }}
      - key: ca.crt
        path: ca.crt
      {{- end }}
{{- if $root.Values.tls.caBundle.enabled }}
- {{ ternary "secret" "configMap" $root.Values.tls.caBundle.useSecret }}:
    name: {{ $root.Values.tls.caBundle.name }}
    items:
      - key: {{ $root.Values.tls.caBundle.key }}
        path: ca.crt
{{- end }}
{{- end -}}

{{/* issuerRef of the cert-manager Certificates. */}}
{{- define "cmapi.certmanager-issuer" -}}
{{- with .Values.clustermesh.apiserver.tls.auto.certManagerIssuerRef -}}
{{- toYaml . -}}
{{- else -}}
group: cert-manager.io
kind: Issuer
name: clustermesh-apiserver-issuer
{{- end -}}
{{- end -}}
