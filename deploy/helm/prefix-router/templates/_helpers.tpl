{{/*
Names and labels shared by the chart's objects.
*/}}

{{/* The router's objects are named after the release, as production-stack's are. */}}
{{- define "router.fullname" -}}
{{- printf "%s-router" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The Service the tutorial port-forwards to: `<release>-router-service`. */}}
{{- define "router.serviceName" -}}
{{- printf "%s-router-service" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "router.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "router.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Labels that select the router's pods; never change between upgrades. */}}
{{- define "router.selectorLabels" -}}
app.kubernetes.io/name: prefix-router
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: router
{{- end -}}

{{/* The same labels as a selector (`key=value,...`): the router's
replicas, its peers (--peer-selector). */}}
{{- define "router.selector" -}}
app.kubernetes.io/name=prefix-router,app.kubernetes.io/instance={{ .Release.Name }},app.kubernetes.io/component=router
{{- end -}}

{{- define "router.labels" -}}
{{ include "router.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | quote }}
{{- end -}}

{{/* The engine pods' namespace. */}}
{{- define "router.engineNamespace" -}}
{{- default .Release.Namespace .Values.routerSpec.k8sNamespace -}}
{{- end -}}

{{/* Whether the pod may load a sockmap program (and so needs
capabilities): `auto` loads sockmap-send where it can. */}}
{{- define "router.sockmap" -}}
{{- if has .Values.routerSpec.dataplane (list "auto" "sockmap" "sockmap-send") -}}true{{- end -}}
{{- end -}}

{{/* Whether the pod attaches the sockops program, and so mounts the
host's cgroup tree. */}}
{{- define "router.sockops" -}}
{{- if has .Values.routerSpec.dataplane (list "auto" "sockmap-send") -}}true{{- end -}}
{{- end -}}

{{/* Refuses values the router cannot run with, with a message saying why. */}}
{{- define "router.validate" -}}
{{- $spec := .Values.routerSpec -}}
{{- if not (has $spec.routingLogic (list "prefixaware" "roundrobin")) -}}
{{- fail (printf "routerSpec.routingLogic %q: use \"prefixaware\" or \"roundrobin\"" $spec.routingLogic) -}}
{{- end -}}
{{- if not (has $spec.serviceDiscovery (list "k8s" "static")) -}}
{{- fail (printf "routerSpec.serviceDiscovery %q: use \"k8s\" or \"static\"" $spec.serviceDiscovery) -}}
{{- end -}}
{{- if and (eq $spec.serviceDiscovery "static") (not $spec.staticBackends) -}}
{{- fail "routerSpec.serviceDiscovery static needs routerSpec.staticBackends (comma-separated engine URLs)" -}}
{{- end -}}
{{- if not (has $spec.dataplane (list "auto" "userspace" "splice" "sockmap" "sockmap-send")) -}}
{{- fail (printf "routerSpec.dataplane %q: use auto, userspace, splice, sockmap or sockmap-send" $spec.dataplane) -}}
{{- end -}}
{{- if not (has $spec.logFormat (list "json" "text")) -}}
{{- fail (printf "routerSpec.logFormat %q: use json or text" $spec.logFormat) -}}
{{- end -}}
{{- if le (int $spec.terminationGracePeriodSeconds) (int $spec.drain.timeoutSeconds) -}}
{{- fail (printf "routerSpec.terminationGracePeriodSeconds (%v) must exceed routerSpec.drain.timeoutSeconds (%v), or the kubelet kills the router mid-drain" $spec.terminationGracePeriodSeconds $spec.drain.timeoutSeconds) -}}
{{- end -}}
{{- end -}}
