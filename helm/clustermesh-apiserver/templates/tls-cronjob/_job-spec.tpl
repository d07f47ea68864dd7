{{/*
The pod of Cilium's certgen, which writes the Secrets through the Kubernetes API: the CA in
`cilium-ca` (made if absent, reused otherwise), and every leaf Secret with its `ca.crt`.
*/}}
{{- define "cmapi.certgen-job-spec" -}}
{{- $validity := printf "%dh" (mul (int .Values.clustermesh.apiserver.tls.auto.certValidityDuration) 24) -}}
{{- $sa := .Values.serviceAccounts.clustermeshcertgen -}}
template:
  metadata:
    labels:
      k8s-app: clustermesh-apiserver-generate-certs
      app.kubernetes.io/part-of: cilium
      {{- with .Values.certgen.podLabels }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
  spec:
    containers:
      - name: certgen
        image: {{ include "cmapi.image" (list . .Values.certgen.image) | quote }}
        imagePullPolicy: {{ .Values.certgen.image.pullPolicy }}
        command:
          - /usr/bin/cilium-certgen
        args:
          {{- if .Values.debug.enabled }}
          - --debug
          {{- end }}
          - --ca-generate
          - --ca-reuse-secret
          - --ca-secret-namespace={{ .Release.Namespace }}
          - --ca-secret-name=cilium-ca
          - --ca-common-name=Cilium CA
        env:
          - name: CILIUM_CERTGEN_CONFIG
            value: |
              certs:
              - name: clustermesh-apiserver-server-cert
                namespace: {{ .Release.Namespace }}
                commonName: clustermesh-apiserver.cilium.io
                hosts:
                {{- range include "cmapi.server-dns-names" . | fromJsonArray }}
                - {{ . | quote }}
                {{- end }}
                {{- range include "cmapi.server-ip-addresses" . | fromJsonArray }}
                - {{ . | quote }}
                {{- end }}
                usage:
                - signing
                - key encipherment
                - server auth
                validity: {{ $validity }}
              {{- range $role := list "admin" "remote" "local" }}
              - name: clustermesh-apiserver-{{ $role }}-cert
                namespace: {{ $.Release.Namespace }}
                commonName: {{ include (printf "cmapi.%s-common-name" $role) $ | quote }}
                usage:
                - signing
                - key encipherment
                - client auth
                validity: {{ $validity }}
              {{- end }}
        securityContext:
          allowPrivilegeEscalation: false
          capabilities:
            drop:
              - ALL
        {{- with .Values.certgen.extraVolumeMounts }}
        volumeMounts:
          {{- toYaml . | nindent 10 }}
        {{- end }}
    # As in Cilium's chart: the Job may run before the pod network is up.
    hostNetwork: true
    serviceAccountName: {{ $sa.name | quote }}
    automountServiceAccountToken: {{ $sa.automount }}
    {{- with .Values.imagePullSecrets }}
    imagePullSecrets:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    restartPolicy: OnFailure
    {{- with .Values.certgen.tolerations }}
    tolerations:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- with .Values.certgen.affinity }}
    affinity:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- with .Values.certgen.extraVolumes }}
    volumes:
      {{- toYaml . | nindent 6 }}
    {{- end }}
ttlSecondsAfterFinished: {{ .Values.certgen.ttlSecondsAfterFinished }}
{{- end -}}
