package k8s

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	policyv1 "k8s.io/api/policy/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
)

// natsPods are the labels of the NATS chart's pods for the release "nats"
// that nats-values.yaml and docs/deployment.md install.
var natsPods = map[string]string{"app.kubernetes.io/name": "nats", "app.kubernetes.io/instance": "nats"}

// decodeStrict reads every document of the manifests into the Kubernetes
// API types (k8s.io/api), strictly: a field the type does not have, a
// duplicate field or a value of the wrong type is an error, as the API
// server's strict field validation would report it.
func decodeStrict(t *testing.T) []runtime.Object {
	t.Helper()
	scheme := runtime.NewScheme()
	for _, add := range []func(*runtime.Scheme) error{corev1.AddToScheme, appsv1.AddToScheme, policyv1.AddToScheme, networkingv1.AddToScheme} {
		if err := add(scheme); err != nil {
			t.Fatal(err)
		}
	}
	dec := serializer.NewCodecFactory(scheme, serializer.EnableStrict).UniversalDeserializer()
	files, err := filepath.Glob("*.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var objs []runtime.Object
	for _, f := range files {
		if f == "nats-values.yaml" {
			continue
		}
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		docs, err := splitDocs(b)
		if err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		for i, doc := range docs {
			obj, _, err := dec.Decode(doc, nil, nil)
			if err != nil {
				t.Fatalf("%s document %d: %v", f, i+1, err)
			}
			objs = append(objs, obj)
		}
	}
	return objs
}

// splitDocs splits a multi-document YAML file, leaving out documents that
// are only comments.
func splitDocs(b []byte) ([][]byte, error) {
	r := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(b)))
	var docs [][]byte
	for {
		doc, err := r.Read()
		if errors.Is(err, io.EOF) {
			return docs, nil
		}
		if err != nil {
			return nil, err
		}
		for _, l := range strings.Split(string(doc), "\n") {
			if l = strings.TrimSpace(l); l != "" && l != "---" && !strings.HasPrefix(l, "#") {
				docs = append(docs, doc)
				break
			}
		}
	}
}

// workload is a Deployment's or StatefulSet's name, replicas and pod template.
type workload struct {
	name     string
	replicas int32
	pod      *corev1.PodTemplateSpec
}

func workloads(objs []runtime.Object) []workload {
	var ws []workload
	for _, o := range objs {
		switch w := o.(type) {
		case *appsv1.Deployment:
			ws = append(ws, workload{"Deployment " + w.Name, ptrOr(w.Spec.Replicas, 1), &w.Spec.Template})
		case *appsv1.StatefulSet:
			ws = append(ws, workload{"StatefulSet " + w.Name, ptrOr(w.Spec.Replicas, 1), &w.Spec.Template})
		}
	}
	return ws
}

func ptrOr[T any](p *T, def T) T {
	if p == nil {
		return def
	}
	return *p
}

func selectsPods(sel *metav1.LabelSelector, pod map[string]string) bool {
	if sel == nil {
		return false
	}
	s, err := metav1.LabelSelectorAsSelector(sel)
	return err == nil && !s.Empty() && s.Matches(labels.Set(pod))
}

// policy returns what a cluster admin would refuse in the manifests: a
// pod that a namespace enforcing Pod Security "restricted" rejects, a
// container without requests and limits, a workload of several replicas
// that may land on one machine or has no PodDisruptionBudget, and pods no
// NetworkPolicy guards (Kuma's and the NATS chart's).
func policy(objs []runtime.Object) []string {
	var errs []string
	bad := func(who, format string, args ...any) { errs = append(errs, who+": "+fmt.Sprintf(format, args...)) }
	var pdbs []*policyv1.PodDisruptionBudget
	var netpols []*networkingv1.NetworkPolicy
	for _, o := range objs {
		switch v := o.(type) {
		case *policyv1.PodDisruptionBudget:
			pdbs = append(pdbs, v)
		case *networkingv1.NetworkPolicy:
			netpols = append(netpols, v)
		}
	}
	guarded := func(pod map[string]string) bool {
		for _, np := range netpols {
			if selectsPods(&np.Spec.PodSelector, pod) && slices.Contains(np.Spec.PolicyTypes, networkingv1.PolicyTypeIngress) {
				return true
			}
		}
		return false
	}
	for _, w := range workloads(objs) {
		ps := &w.pod.Spec
		restricted(w.name, ps, bad)
		bounded(w.name, ps, bad)
		if !guarded(w.pod.Labels) {
			bad(w.name, "no NetworkPolicy of type Ingress selects its pods")
		}
		if w.replicas < 2 {
			continue
		}
		if !spreadOverHosts(ps, w.pod.Labels) {
			bad(w.name, "%d replicas with no topology spread or anti-affinity over kubernetes.io/hostname selecting its pods: all may land on one machine", w.replicas)
		}
		if !slices.ContainsFunc(pdbs, func(p *policyv1.PodDisruptionBudget) bool { return selectsPods(p.Spec.Selector, w.pod.Labels) }) {
			bad(w.name, "%d replicas and no PodDisruptionBudget selecting its pods", w.replicas)
		}
	}
	if !guarded(natsPods) {
		bad("NATS", "no NetworkPolicy of type Ingress selects the chart's pods %v: its client port would take anyone", natsPods)
	}
	return errs
}

// bounded reports each container of the pod without CPU and memory
// requests and limits, or with a limit below its request.
func bounded(who string, ps *corev1.PodSpec, bad func(string, string, ...any)) {
	for _, c := range allContainers(ps) {
		for _, r := range []corev1.ResourceName{corev1.ResourceCPU, corev1.ResourceMemory} {
			req, lim := c.Resources.Requests[r], c.Resources.Limits[r]
			if req.IsZero() || lim.IsZero() {
				bad(who, "container %s has no %s request and limit (requests %v, limits %v)", c.Name, r, c.Resources.Requests, c.Resources.Limits)
			} else if lim.Cmp(req) < 0 {
				bad(who, "container %s: %s limit %s below its request %s", c.Name, r, lim.String(), req.String())
			}
		}
	}
}

func allContainers(ps *corev1.PodSpec) []corev1.Container {
	return append(slices.Clone(ps.InitContainers), ps.Containers...)
}

// restricted applies the Pod Security Standards' "restricted" profile (and
// so "baseline") to a pod, as the admission controller does: each
// container's effective setting is its own, else the pod's.
func restricted(who string, ps *corev1.PodSpec, bad func(string, string, ...any)) {
	if ps.HostNetwork || ps.HostPID || ps.HostIPC {
		bad(who, "uses the host's network, PID or IPC namespace")
	}
	allowedVolume := func(v corev1.Volume) bool {
		s := v.VolumeSource
		return s.ConfigMap != nil || s.CSI != nil || s.DownwardAPI != nil || s.EmptyDir != nil || s.Ephemeral != nil ||
			s.PersistentVolumeClaim != nil || s.Projected != nil || s.Secret != nil
	}
	for _, v := range ps.Volumes {
		if !allowedVolume(v) {
			bad(who, "volume %s is of a type restricted does not allow", v.Name)
		}
	}
	pod := ps.SecurityContext
	if pod == nil {
		pod = &corev1.PodSecurityContext{}
	}
	if pod.RunAsUser != nil && *pod.RunAsUser == 0 {
		bad(who, "the pod runs as uid 0")
	}
	for _, c := range allContainers(ps) {
		sc := c.SecurityContext
		if sc == nil {
			sc = &corev1.SecurityContext{}
		}
		if !ptrOr(sc.RunAsNonRoot, ptrOr(pod.RunAsNonRoot, false)) {
			bad(who, "container %s: runAsNonRoot is not true (container or pod)", c.Name)
		}
		if sc.RunAsUser != nil && *sc.RunAsUser == 0 {
			bad(who, "container %s runs as uid 0", c.Name)
		}
		if sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
			bad(who, "container %s: allowPrivilegeEscalation is not false", c.Name)
		}
		if ptrOr(sc.Privileged, false) {
			bad(who, "container %s is privileged", c.Name)
		}
		if sc.Capabilities == nil || !slices.Contains(sc.Capabilities.Drop, "ALL") {
			bad(who, "container %s: capabilities.drop is not [ALL]", c.Name)
		} else if slices.ContainsFunc(sc.Capabilities.Add, func(c corev1.Capability) bool { return c != "NET_BIND_SERVICE" }) {
			bad(who, "container %s adds capabilities %v", c.Name, sc.Capabilities.Add)
		}
		seccomp := sc.SeccompProfile
		if seccomp == nil {
			seccomp = pod.SeccompProfile
		}
		if seccomp == nil || (seccomp.Type != corev1.SeccompProfileTypeRuntimeDefault && seccomp.Type != corev1.SeccompProfileTypeLocalhost) {
			bad(who, "container %s: seccompProfile is not RuntimeDefault or Localhost (container or pod)", c.Name)
		}
		for _, p := range c.Ports {
			if p.HostPort != 0 {
				bad(who, "container %s uses host port %d", c.Name, p.HostPort)
			}
		}
	}
}

// spreadOverHosts reports whether the pod asks to be spread over machines:
// a topology spread constraint or a pod anti-affinity term over
// kubernetes.io/hostname that selects the workload's own pods.
func spreadOverHosts(ps *corev1.PodSpec, pod map[string]string) bool {
	for _, c := range ps.TopologySpreadConstraints {
		if c.TopologyKey == corev1.LabelHostname && c.MaxSkew >= 1 && selectsPods(c.LabelSelector, pod) {
			return true
		}
	}
	if a := ps.Affinity; a != nil && a.PodAntiAffinity != nil {
		terms := slices.Clone(a.PodAntiAffinity.RequiredDuringSchedulingIgnoredDuringExecution)
		for _, w := range a.PodAntiAffinity.PreferredDuringSchedulingIgnoredDuringExecution {
			terms = append(terms, w.PodAffinityTerm)
		}
		for _, term := range terms {
			if term.TopologyKey == corev1.LabelHostname && selectsPods(term.LabelSelector, pod) {
				return true
			}
		}
	}
	return false
}

func TestManifestsDecodeStrictly(t *testing.T) {
	objs := decodeStrict(t)
	if len(objs) != len(load(t)) {
		t.Fatalf("the strict decoder read %d objects, the checker %d", len(objs), len(load(t)))
	}
	for _, p := range policy(objs) {
		t.Error(p)
	}
}

// TestStrictDecodingCatches: a field the Kubernetes type lacks (a typo, a
// field at the wrong level) and a wrong value type are refused.
func TestStrictDecodingCatches(t *testing.T) {
	scheme := runtime.NewScheme()
	_ = appsv1.AddToScheme(scheme)
	dec := serializer.NewCodecFactory(scheme, serializer.EnableStrict).UniversalDeserializer()
	for name, doc := range map[string]string{
		"a misspelt field":     "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\nspec:\n  replica: 2\n",
		"a field too high":     "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\nspec:\n  securityContext: {runAsNonRoot: true}\n",
		"a string for a int":   "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\nspec:\n  replicas: two\n",
		"a duplicated field":   "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\nspec:\n  replicas: 1\n  replicas: 2\n",
		"an unregistered kind": "apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: x}\n",
	} {
		if _, _, err := dec.Decode([]byte(doc), nil, nil); err == nil {
			t.Errorf("%s: decoded without an error", name)
		}
	}
}

// TestPolicyCatches breaks a copy of the manifests once per rule; each
// break must be reported.
func TestPolicyCatches(t *testing.T) {
	find := func(objs []runtime.Object, name string) *corev1.PodTemplateSpec {
		for _, w := range workloads(objs) {
			if w.name == name {
				return w.pod
			}
		}
		t.Fatalf("no %s to break", name)
		return nil
	}
	container := func(objs []runtime.Object, name string) *corev1.Container {
		return &find(objs, name).Spec.Containers[0]
	}
	withInit := func(objs []runtime.Object, mutate func(*corev1.Container)) {
		pod := find(objs, "StatefulSet kuma-shardnode")
		c := *pod.Spec.Containers[0].DeepCopy()
		c.Name = "init"
		mutate(&c)
		pod.Spec.InitContainers = append(pod.Spec.InitContainers, c)
	}
	for _, tc := range []struct {
		name   string
		break_ func([]runtime.Object) []runtime.Object
		want   string
	}{
		{"runAsNonRoot missing", func(objs []runtime.Object) []runtime.Object {
			container(objs, "Deployment kuma-router").SecurityContext.RunAsNonRoot = nil
			find(objs, "Deployment kuma-router").Spec.SecurityContext.RunAsNonRoot = nil
			return objs
		}, "runAsNonRoot is not true"},
		{"privilege escalation allowed", func(objs []runtime.Object) []runtime.Object {
			container(objs, "Deployment kuma-keyvault").SecurityContext.AllowPrivilegeEscalation = nil
			return objs
		}, "allowPrivilegeEscalation is not false"},
		{"capabilities kept", func(objs []runtime.Object) []runtime.Object {
			container(objs, "Deployment kuma-projector").SecurityContext.Capabilities = nil
			return objs
		}, "capabilities.drop is not [ALL]"},
		{"a capability added", func(objs []runtime.Object) []runtime.Object {
			container(objs, "Deployment kuma-projector").SecurityContext.Capabilities.Add = []corev1.Capability{"NET_ADMIN"}
			return objs
		}, "adds capabilities"},
		{"no seccomp profile", func(objs []runtime.Object) []runtime.Object {
			container(objs, "StatefulSet kuma-shardnode").SecurityContext.SeccompProfile = nil
			find(objs, "StatefulSet kuma-shardnode").Spec.SecurityContext.SeccompProfile = nil
			return objs
		}, "seccompProfile is not RuntimeDefault"},
		{"an init container without the security context", func(objs []runtime.Object) []runtime.Object {
			withInit(objs, func(c *corev1.Container) { c.SecurityContext = nil })
			return objs
		}, "container init: allowPrivilegeEscalation is not false"},
		{"a hostPath volume", func(objs []runtime.Object) []runtime.Object {
			p := find(objs, "Deployment kuma-router")
			p.Spec.Volumes = append(p.Spec.Volumes, corev1.Volume{Name: "host", VolumeSource: corev1.VolumeSource{HostPath: &corev1.HostPathVolumeSource{Path: "/"}}})
			return objs
		}, "volume host is of a type"},
		{"no limits", func(objs []runtime.Object) []runtime.Object {
			container(objs, "Deployment kuma-router").Resources.Limits = nil
			return objs
		}, "container router has no cpu request and limit"},
		{"no requests on an init container", func(objs []runtime.Object) []runtime.Object {
			withInit(objs, func(c *corev1.Container) { c.Resources.Requests = nil })
			return objs
		}, "container init has no cpu request and limit"},
		{"a limit below its request", func(objs []runtime.Object) []runtime.Object {
			container(objs, "StatefulSet kuma-shardnode").Resources.Limits[corev1.ResourceMemory] = resource.MustParse("64Mi")
			return objs
		}, "memory limit 64Mi below its request"},
		{"shardnodes not spread", func(objs []runtime.Object) []runtime.Object {
			find(objs, "StatefulSet kuma-shardnode").Spec.TopologySpreadConstraints = nil
			return objs
		}, "StatefulSet kuma-shardnode: 3 replicas with no topology spread"},
		{"a spread that selects other pods", func(objs []runtime.Object) []runtime.Object {
			for i := range find(objs, "Deployment kuma-router").Spec.TopologySpreadConstraints {
				find(objs, "Deployment kuma-router").Spec.TopologySpreadConstraints[i].LabelSelector.MatchLabels["app.kubernetes.io/component"] = "shardnode"
			}
			return objs
		}, "Deployment kuma-router: 2 replicas with no topology spread"},
		{"the router's PDB missing", func(objs []runtime.Object) []runtime.Object {
			return slices.DeleteFunc(objs, func(o runtime.Object) bool {
				p, ok := o.(*policyv1.PodDisruptionBudget)
				return ok && p.Name == "kuma-router"
			})
		}, "Deployment kuma-router: 2 replicas and no PodDisruptionBudget"},
		{"Kuma's NetworkPolicy missing", func(objs []runtime.Object) []runtime.Object {
			return slices.DeleteFunc(objs, func(o runtime.Object) bool {
				p, ok := o.(*networkingv1.NetworkPolicy)
				return ok && p.Name == "kuma"
			})
		}, "Deployment kuma-keyvault: no NetworkPolicy"},
		{"the NATS NetworkPolicy missing", func(objs []runtime.Object) []runtime.Object {
			return slices.DeleteFunc(objs, func(o runtime.Object) bool {
				p, ok := o.(*networkingv1.NetworkPolicy)
				return ok && p.Name == "nats"
			})
		}, "NATS: no NetworkPolicy"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			problems := policy(tc.break_(decodeStrict(t))) // a fresh copy each time
			if !slices.ContainsFunc(problems, func(p string) bool { return strings.Contains(p, tc.want) }) {
				t.Fatalf("problems %q do not report %q", problems, tc.want)
			}
		})
	}
}
