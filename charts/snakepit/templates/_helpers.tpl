{{/* Release-scoped name of the operator's objects. */}}
{{- define "snakepit.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* The TokenReview ClusterRole and its binding (cluster-scoped: one per release). */}}
{{- define "snakepit.tokenReviewer" -}}
{{- printf "%s-tokenreviewer" (include "snakepit.fullname" .) -}}
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
# Secrets the operator makes: the managed store's password, the ticket key and the two
# namespace Secrets of operator-issued certificates. Created, never listed or watched.
- apiGroups: [""]
  resources: [secrets]
  verbs: [create]
# Operator-issued certificates (spec.tls without secretName, builders/certs.py): the pools' CAs
# and their leaves, in two Secrets with fixed names, read and merge-patched by those names only.
# Never patch/update on other Secrets: both answer with the whole Secret, a read in disguise.
- apiGroups: [""]
  resources: [secrets]
  resourceNames: [snakepit-ca, snakepit-certs]
  verbs: [get, patch]
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
