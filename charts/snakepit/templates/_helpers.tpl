{{/* Release-scoped name of the operator's objects. */}}
{{- define "snakepit.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "snakepit.selectorLabels" -}}
app.kubernetes.io/name: {{ printf "%s-operator" .Chart.Name | quote }}
app.kubernetes.io/instance: {{ .Release.Name | quote }}
{{- end -}}

{{/* Labels of everything the release makes, without the operator pod selector. */}}
{{- define "snakepit.commonLabels" -}}
app.kubernetes.io/instance: {{ .Release.Name | quote }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service | quote }}
app.kubernetes.io/part-of: snakepit
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | quote }}
{{- end -}}

{{- define "snakepit.labels" -}}
app.kubernetes.io/name: {{ printf "%s-operator" .Chart.Name | quote }}
{{ include "snakepit.commonLabels" . }}
{{- end -}}

{{- define "snakepit.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "snakepit.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "snakepit.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{- define "snakepit.pullSecretNames" -}}
{{- $names := list -}}
{{- range .Values.imagePullSecrets }}{{ $names = append $names .name }}{{ end -}}
{{- join "," $names -}}
{{- end -}}

{{/* Namespaces served when not cluster-wide: the listed ones, else the release namespace. */}}
{{- define "snakepit.watchNamespaces" -}}
{{- if .Values.watch.namespaces -}}
{{- join "," (uniq .Values.watch.namespaces) -}}
{{- else -}}
{{- .Release.Namespace -}}
{{- end -}}
{{- end -}}

{{/* What the operator does, and nothing more. Shared by the ClusterRole and each Role. */}}
{{- define "snakepit.operatorRules" -}}
# Pools: watched by kopf, read fresh by each pass, status written back.
- apiGroups: [snakepit.dev]
  resources: [snakepitpools]
  verbs: [get, list, watch]
- apiGroups: [snakepit.dev]
  resources: [snakepitpools/status]
  verbs: [get, patch]
# Children carry blockOwnerDeletion owner references; clusters running the
# OwnerReferencesPermissionEnforcement admission plugin require this.
- apiGroups: [snakepit.dev]
  resources: [snakepitpools/finalizers]
  verbs: [update]
# Children: watched (changes and deletions trigger a pass), server-side applied, pruned.
- apiGroups: [apps]
  resources: [deployments, statefulsets]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [""]
  resources: [services, serviceaccounts]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [rbac.authorization.k8s.io]
  resources: [roles, rolebindings]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [policy]
  resources: [poddisruptionbudgets]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [get, list, watch, create, patch, delete]
# Secrets the operator makes: the managed store's password, the ticket key, the namespace CA
# and the pools' certificates. Created, never listed or watched, and read only by one fixed
# name (next rule), so even a cluster-wide install cannot read the cluster's Secrets. patch:
# renewing a pool's certificate (<pool>-tls) in place (server-side apply); names per pool
# cannot be listed in resourceNames, so this is write-only access to Secrets.
- apiGroups: [""]
  resources: [secrets]
  verbs: [create, patch]
# The namespace's CA for operator-issued certificates (spec.tls without secretName): this one
# name only (builders/certs.py CA_SECRET).
- apiGroups: [""]
  resources: [secrets]
  resourceNames: [snakepit-ca]
  verbs: [get]
# Events on pools (condition transitions, kopf warnings).
- apiGroups: [""]
  resources: [events]
  verbs: [create]
# Held only so the operator may grant it: RBAC lets a Role be created/bound only by someone
# who has its permissions (no escalate/bind verbs needed). Routers read their workers' slices.
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [get, list, watch]
{{- end -}}
