package k8s

import (
	"fmt"
	"slices"
)

// apiVersions is every kind the manifests may hold, with its API version.
var apiVersions = map[string]string{
	"ConfigMap": "v1", "Secret": "v1", "Service": "v1", "PersistentVolumeClaim": "v1",
	"Deployment": "apps/v1", "StatefulSet": "apps/v1", "PodDisruptionBudget": "policy/v1",
	"NetworkPolicy": "networking.k8s.io/v1",
}

// operatorSecrets are the Secrets an operator creates (certificates and
// passwords have no place in a file of this repository); docs/deployment.md
// gives the command for each, which TestOperatorSecretsDocumented checks.
var operatorSecrets = map[string][]string{
	"kuma-nats-users":      {"client", "console", "ops", "follower", "router", "shardnode", "projector", "keyvault"},
	"kuma-nats-client-tls": {"ca.crt", "tls.crt", "tls.key"},
	"nats-server-tls":      {"ca.crt", "tls.crt", "tls.key"},
}

// selects reports whether every label of sel is on labels.
func selects(sel, labels map[string]string) bool {
	if len(sel) == 0 {
		return false
	}
	for k, v := range sel {
		if labels[k] != v {
			return false
		}
	}
	return true
}

// portOf finds a named or numbered port among a pod's containers.
func portOf(cs []container, port any) bool {
	for _, c := range cs {
		for _, p := range c.Ports {
			switch v := port.(type) {
			case string:
				if p.Name == v {
					return true
				}
			case int:
				if p.ContainerPort == v {
					return true
				}
			}
		}
	}
	return false
}

// check returns every problem of the set of manifests.
func check(objs []*object) []string {
	var errs []string
	bad := func(o *object, format string, args ...any) {
		errs = append(errs, o.String()+": "+fmt.Sprintf(format, args...))
	}
	byKind := map[string]map[string]*object{}
	for _, o := range objs {
		want, ok := apiVersions[o.Kind]
		switch {
		case !ok:
			bad(o, "kind %q is not one the checker knows", o.Kind)
		case o.APIVersion != want:
			bad(o, "apiVersion %q, want %q", o.APIVersion, want)
		}
		if o.Metadata.Name == "" {
			bad(o, "no metadata.name")
		}
		if byKind[o.Kind] == nil {
			byKind[o.Kind] = map[string]*object{}
		}
		if byKind[o.Kind][o.Metadata.Name] != nil {
			bad(o, "a second %s of that name", o.Kind)
		}
		byKind[o.Kind][o.Metadata.Name] = o
	}
	var workloads []*object
	for _, o := range objs {
		if o.workload() {
			workloads = append(workloads, o)
		}
	}
	// selected is the workloads whose pods carry every label of sel.
	selected := func(sel map[string]string) []*object {
		var out []*object
		for _, w := range workloads {
			if selects(sel, w.Spec.Template.Metadata.Labels) {
				out = append(out, w)
			}
		}
		return out
	}
	secretKey := func(o *object, name, key string) {
		if keys, ok := operatorSecrets[name]; ok {
			if key != "" && !slices.Contains(keys, key) {
				bad(o, "uses key %q of Secret %q, which the documented command does not create", key, name)
			}
			return
		}
		s := byKind["Secret"][name]
		if s == nil {
			bad(o, "uses Secret %q, which is not among the manifests", name)
			return
		}
		if _, ok := s.StringData[key]; key != "" && !ok {
			if _, ok := s.Data[key]; !ok {
				bad(o, "uses key %q of Secret %q, which has no such key", key, name)
			}
		}
	}
	configMapKey := func(o *object, name, key string) {
		cm := byKind["ConfigMap"][name]
		if cm == nil {
			bad(o, "uses ConfigMap %q, which is not among the manifests", name)
			return
		}
		if _, ok := cm.Data[key]; key != "" && !ok {
			bad(o, "uses key %q of ConfigMap %q, which has no such key", key, name)
		}
	}
	for _, o := range objs {
		switch o.Kind {
		case "ConfigMap":
			if len(o.Data) == 0 {
				bad(o, "no data")
			}
		case "Secret":
			if len(o.Data)+len(o.StringData) == 0 {
				bad(o, "no data")
			}
		case "PersistentVolumeClaim":
			if len(o.Spec.AccessModes) == 0 {
				bad(o, "no accessModes")
			}
		case "Service":
			if len(o.Spec.Ports) == 0 {
				bad(o, "no ports")
			}
			pods := selected(o.Spec.Selector.Plain)
			if len(pods) == 0 {
				bad(o, "selector %v matches no pod template", o.Spec.Selector.Plain)
			}
			for _, p := range o.Spec.Ports {
				target := p.TargetPort
				if target == nil {
					target = p.Port
				}
				for _, w := range pods {
					if !portOf(w.Spec.Template.Spec.Containers, target) {
						bad(o, "port %v is not a container port of %s", target, w)
					}
				}
			}
		case "PodDisruptionBudget":
			if (o.Spec.MaxUnavailable == nil) == (o.Spec.MinAvailable == nil) {
				bad(o, "give exactly one of maxUnavailable and minAvailable")
			}
			if len(selected(o.Spec.Selector.MatchLabels)) == 0 {
				bad(o, "selector %v matches no pod template", o.Spec.Selector.MatchLabels)
			}
		case "Deployment", "StatefulSet":
			checkWorkload(o, byKind, bad, secretKey, configMapKey)
		}
	}
	if len(byKind["PodDisruptionBudget"]) == 0 {
		errs = append(errs, "no PodDisruptionBudget")
	}
	return errs
}

func checkWorkload(o *object, byKind map[string]map[string]*object, bad func(*object, string, ...any), secretKey, configMapKey func(*object, string, string)) {
	ps := o.Spec.Template.Spec
	if o.Spec.Replicas == nil {
		bad(o, "no replicas")
	}
	if !selects(o.Spec.Selector.MatchLabels, o.Spec.Template.Metadata.Labels) {
		bad(o, "selector %v does not match its pod template's labels %v", o.Spec.Selector.MatchLabels, o.Spec.Template.Metadata.Labels)
	}
	if len(ps.Containers) == 0 {
		bad(o, "no containers")
	}
	volumes := map[string]bool{}
	for _, v := range ps.Volumes {
		volumes[v.Name] = true
		switch {
		case v.PersistentVolumeClaim != nil:
			if byKind["PersistentVolumeClaim"][v.PersistentVolumeClaim.ClaimName] == nil {
				bad(o, "volume %s: PersistentVolumeClaim %q is not among the manifests", v.Name, v.PersistentVolumeClaim.ClaimName)
			}
		case v.Secret != nil:
			secretKey(o, v.Secret.SecretName, "")
			for _, it := range v.Secret.Items {
				secretKey(o, v.Secret.SecretName, it.Key)
			}
		case v.ConfigMap != nil:
			configMapKey(o, v.ConfigMap.Name, "")
		}
	}
	if o.Kind == "StatefulSet" {
		if len(o.Spec.VolumeClaimTemplates) == 0 {
			bad(o, "no volumeClaimTemplates: a shardnode keeps its shard files on its own volume")
		}
		for _, vct := range o.Spec.VolumeClaimTemplates {
			volumes[vct.Metadata.Name] = true
		}
		svc := byKind["Service"][o.Spec.ServiceName]
		switch {
		case svc == nil:
			bad(o, "serviceName %q is not a Service among the manifests", o.Spec.ServiceName)
		case svc.Spec.ClusterIP != "None":
			bad(o, "serviceName %q is not a headless Service (clusterIP: None)", o.Spec.ServiceName)
		case !selects(svc.Spec.Selector.Plain, o.Spec.Template.Metadata.Labels):
			bad(o, "its headless Service %q does not select its pods", o.Spec.ServiceName)
		}
	}
	for _, c := range ps.Containers {
		if c.Image == "" {
			bad(o, "container %s has no image", c.Name)
		}
		if len(c.Args) < 3 || c.Args[0] != "serve" || c.Args[1] != "--target" {
			bad(o, "container %s: args %v, want serve --target T", c.Name, c.Args)
		}
		for _, ef := range c.EnvFrom {
			if ef.ConfigMapRef != nil {
				configMapKey(o, ef.ConfigMapRef.Name, "")
			}
			if ef.SecretRef != nil {
				secretKey(o, ef.SecretRef.Name, "")
			}
		}
		for _, e := range c.Env {
			if e.ValueFrom == nil {
				continue
			}
			if r := e.ValueFrom.SecretKeyRef; r != nil {
				secretKey(o, r.Name, r.Key)
			}
			if r := e.ValueFrom.ConfigMapKeyRef; r != nil {
				configMapKey(o, r.Name, r.Key)
			}
		}
		for _, pr := range []struct {
			name, path string
			p          *probe
		}{{"readinessProbe", "/readyz", c.ReadinessProbe}, {"livenessProbe", "/healthz", c.LivenessProbe}} {
			switch {
			case pr.p == nil || pr.p.HTTPGet == nil:
				bad(o, "container %s has no %s httpGet", c.Name, pr.name)
			case pr.p.HTTPGet.Path != pr.path:
				bad(o, "container %s: %s path %q, want %s", c.Name, pr.name, pr.p.HTTPGet.Path, pr.path)
			case !portOf([]container{c}, pr.p.HTTPGet.Port):
				bad(o, "container %s: %s port %v is not one of its ports", c.Name, pr.name, pr.p.HTTPGet.Port)
			}
		}
		for _, m := range c.VolumeMounts {
			if !volumes[m.Name] {
				bad(o, "container %s mounts volume %q, which the pod does not have", c.Name, m.Name)
			}
		}
	}
}
