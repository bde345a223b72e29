// Package k8s checks Kuma's Kubernetes manifests without a cluster: every
// YAML document parses, has the fields its kind requires, and what one
// object names exists among the others (the pods a Service or a
// PodDisruptionBudget selects, the Secrets and ConfigMaps a pod uses, the
// ports its probes call, the StatefulSet's headless Service). The checker
// is also run on broken copies, each of which it must reject.
package k8s

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/kumadb/kuma/internal/app"
	"go.yaml.in/yaml/v3"
)

// object is the part of a manifest the checker reads.
type object struct {
	APIVersion string `yaml:"apiVersion"`
	Kind       string `yaml:"kind"`
	Metadata   meta   `yaml:"metadata"`
	Spec       spec   `yaml:"spec"`
	// ConfigMap and Secret.
	Data       map[string]string `yaml:"data"`
	StringData map[string]string `yaml:"stringData"`
	file       string
}

type meta struct {
	Name   string            `yaml:"name"`
	Labels map[string]string `yaml:"labels"`
}

type spec struct {
	// Deployment, StatefulSet, PodDisruptionBudget.
	Replicas             *int        `yaml:"replicas"`
	Selector             rawSelector `yaml:"selector"`
	Template             podTemplate `yaml:"template"`
	ServiceName          string      `yaml:"serviceName"`
	VolumeClaimTemplates []struct {
		Metadata meta `yaml:"metadata"`
	} `yaml:"volumeClaimTemplates"`
	MaxUnavailable any `yaml:"maxUnavailable"`
	MinAvailable   any `yaml:"minAvailable"`
	// Service.
	ClusterIP string        `yaml:"clusterIP"`
	Ports     []servicePort `yaml:"ports"`
	// PersistentVolumeClaim.
	AccessModes []string `yaml:"accessModes"`
}

// rawSelector is a workload's or PDB's {matchLabels: ...}, or a Service's
// plain label map.
type rawSelector struct {
	MatchLabels map[string]string
	Plain       map[string]string
}

func (s *rawSelector) UnmarshalYAML(n *yaml.Node) error {
	var m map[string]yaml.Node
	if err := n.Decode(&m); err != nil {
		return err
	}
	if ml, ok := m["matchLabels"]; ok {
		return ml.Decode(&s.MatchLabels)
	}
	return n.Decode(&s.Plain)
}

type servicePort struct {
	Name       string `yaml:"name"`
	Port       int    `yaml:"port"`
	TargetPort any    `yaml:"targetPort"`
}

type podTemplate struct {
	Metadata meta    `yaml:"metadata"`
	Spec     podSpec `yaml:"spec"`
}

type podSpec struct {
	Containers []container `yaml:"containers"`
	Volumes    []struct {
		Name                  string `yaml:"name"`
		PersistentVolumeClaim *struct {
			ClaimName string `yaml:"claimName"`
		} `yaml:"persistentVolumeClaim"`
		Secret *struct {
			SecretName string `yaml:"secretName"`
			Items      []struct {
				Key string `yaml:"key"`
			} `yaml:"items"`
		} `yaml:"secret"`
		ConfigMap *struct {
			Name string `yaml:"name"`
		} `yaml:"configMap"`
		EmptyDir any `yaml:"emptyDir"`
	} `yaml:"volumes"`
}

type container struct {
	Name    string   `yaml:"name"`
	Image   string   `yaml:"image"`
	Args    []string `yaml:"args"`
	EnvFrom []struct {
		ConfigMapRef *struct {
			Name string `yaml:"name"`
		} `yaml:"configMapRef"`
		SecretRef *struct {
			Name string `yaml:"name"`
		} `yaml:"secretRef"`
	} `yaml:"envFrom"`
	Env []struct {
		Name      string `yaml:"name"`
		ValueFrom *struct {
			SecretKeyRef    *keyRef `yaml:"secretKeyRef"`
			ConfigMapKeyRef *keyRef `yaml:"configMapKeyRef"`
		} `yaml:"valueFrom"`
	} `yaml:"env"`
	Ports []struct {
		Name          string `yaml:"name"`
		ContainerPort int    `yaml:"containerPort"`
	} `yaml:"ports"`
	ReadinessProbe *probe `yaml:"readinessProbe"`
	LivenessProbe  *probe `yaml:"livenessProbe"`
	VolumeMounts   []struct {
		Name      string `yaml:"name"`
		MountPath string `yaml:"mountPath"`
	} `yaml:"volumeMounts"`
}

type keyRef struct {
	Name string `yaml:"name"`
	Key  string `yaml:"key"`
}

type probe struct {
	HTTPGet *struct {
		Path string `yaml:"path"`
		Port any    `yaml:"port"`
	} `yaml:"httpGet"`
}

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

// load parses every YAML document of the directory's manifests (the Helm
// values file is not a manifest; TestNATSValues reads it).
func load(t *testing.T) []*object {
	t.Helper()
	files, err := filepath.Glob("*.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var objs []*object
	for _, f := range files {
		if f == "nats-values.yaml" {
			continue
		}
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		dec := yaml.NewDecoder(bytes.NewReader(b))
		for i := 1; ; i++ {
			var n yaml.Node
			if err := dec.Decode(&n); errors.Is(err, io.EOF) {
				break
			} else if err != nil {
				t.Fatalf("%s document %d: %v", f, i, err)
			}
			if len(n.Content) == 0 || n.Content[0].Kind != yaml.MappingNode || len(n.Content[0].Content) == 0 {
				continue // an empty document (a comment between ---)
			}
			o := &object{file: fmt.Sprintf("%s#%d", f, i)}
			if err := n.Decode(o); err != nil {
				t.Fatalf("%s document %d: %v", f, i, err)
			}
			objs = append(objs, o)
		}
	}
	if len(objs) == 0 {
		t.Fatal("no manifests found")
	}
	return objs
}

func (o *object) String() string { return fmt.Sprintf("%s %s (%s)", o.Kind, o.Metadata.Name, o.file) }

func (o *object) workload() bool { return o.Kind == "Deployment" || o.Kind == "StatefulSet" }

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

func TestManifests(t *testing.T) {
	objs := load(t)
	for _, p := range check(objs) {
		t.Error(p)
	}
	kinds := map[string]int{}
	for _, o := range objs {
		kinds[o.Kind+"/"+o.Metadata.Name]++
	}
	// What issue 9 asks for, by name.
	for _, want := range []string{"StatefulSet/kuma-shardnode", "Service/kuma-shardnode", "Deployment/kuma-router",
		"Deployment/kuma-projector", "Deployment/kuma-keyvault", "PodDisruptionBudget/kuma-shardnode", "Secret/kuma-master-key"} {
		if kinds[want] == 0 {
			t.Errorf("no %s", want)
		}
	}
	// Every target the manifests run is one kuma serve knows.
	for _, o := range objs {
		for _, c := range o.Spec.Template.Spec.Containers {
			if len(c.Args) > 2 {
				if _, err := app.New(app.Config{Target: c.Args[2], DataDir: t.TempDir(), NATSURL: "nats://nats:4222"}); err != nil && strings.Contains(err.Error(), "unknown") {
					t.Errorf("%s: target %s: %v", o, c.Args[2], err)
				}
			}
		}
	}
	// The Secret's placeholder is refused, so nothing runs on it.
	for _, o := range objs {
		if o.Kind == "Secret" {
			for k, v := range o.StringData {
				if _, err := app.DecodeMasterKey(v); err == nil {
					t.Errorf("%s: key %s holds a usable master key; the manifests must ship a placeholder kuma refuses", o, k)
				}
			}
		}
	}
}

// TestManifestCheckerCatches runs the checker on broken copies of the
// manifests; each break must be reported.
func TestManifestCheckerCatches(t *testing.T) {
	find := func(objs []*object, kind, name string) *object {
		i := slices.IndexFunc(objs, func(o *object) bool { return o.Kind == kind && o.Metadata.Name == name })
		if i < 0 {
			t.Fatalf("no %s %s to break", kind, name)
		}
		return objs[i]
	}
	for _, tc := range []struct {
		name   string
		break_ func([]*object) []*object
		want   string
	}{
		{"a Service selecting no pod", func(objs []*object) []*object {
			find(objs, "Service", "kuma-shardnode").Spec.Selector.Plain["app.kubernetes.io/component"] = "shardnodes"
			return objs
		}, "matches no pod template"},
		{"a probe on a port the container lacks", func(objs []*object) []*object {
			c := &find(objs, "Deployment", "kuma-router").Spec.Template.Spec.Containers[0]
			c.ReadinessProbe.HTTPGet.Port = "http"
			return objs
		}, "readinessProbe port http"},
		{"a liveness probe on /readyz", func(objs []*object) []*object {
			find(objs, "StatefulSet", "kuma-shardnode").Spec.Template.Spec.Containers[0].LivenessProbe.HTTPGet.Path = "/readyz"
			return objs
		}, "livenessProbe path"},
		{"the Secret missing", func(objs []*object) []*object {
			return slices.DeleteFunc(objs, func(o *object) bool { return o.Kind == "Secret" })
		}, `Secret "kuma-master-key", which is not among`},
		{"a Secret key missing", func(objs []*object) []*object {
			s := find(objs, "Secret", "kuma-master-key")
			s.StringData = map[string]string{"key": "x"}
			return objs
		}, `key "master.key" of Secret`},
		{"the ConfigMap renamed", func(objs []*object) []*object {
			find(objs, "ConfigMap", "kuma-config").Metadata.Name = "kuma-settings"
			return objs
		}, `ConfigMap "kuma-config", which is not among`},
		{"the StatefulSet's Service not headless", func(objs []*object) []*object {
			find(objs, "Service", "kuma-shardnode").Spec.ClusterIP = ""
			return objs
		}, "not a headless Service"},
		{"the StatefulSet naming another Service", func(objs []*object) []*object {
			find(objs, "StatefulSet", "kuma-shardnode").Spec.ServiceName = "kuma-shards"
			return objs
		}, `serviceName "kuma-shards" is not a Service`},
		{"a PDB selecting nothing", func(objs []*object) []*object {
			find(objs, "PodDisruptionBudget", "kuma-shardnode").Spec.Selector.MatchLabels = map[string]string{"app": "kuma"}
			return objs
		}, "matches no pod template"},
		{"a workload whose selector misses its pods", func(objs []*object) []*object {
			find(objs, "Deployment", "kuma-keyvault").Spec.Template.Metadata.Labels = map[string]string{"app.kubernetes.io/name": "kuma"}
			return objs
		}, "does not match its pod template's labels"},
		{"a mount of a volume the pod lacks", func(objs []*object) []*object {
			find(objs, "StatefulSet", "kuma-shardnode").Spec.VolumeClaimTemplates[0].Metadata.Name = "shards"
			return objs
		}, `mounts volume "data"`},
		{"a wrong apiVersion", func(objs []*object) []*object {
			find(objs, "PodDisruptionBudget", "kuma-shardnode").APIVersion = "policy/v1beta1"
			return objs
		}, `apiVersion "policy/v1beta1"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			problems := check(tc.break_(load(t))) // a fresh copy each time
			if !slices.ContainsFunc(problems, func(p string) bool { return strings.Contains(p, tc.want) }) {
				t.Fatalf("problems %q do not report %q", problems, tc.want)
			}
		})
	}
}

// TestNATSValues checks the values we ship for the official NATS Helm chart:
// a cluster of three with JetStream on file storage, and Kuma's payload size.
func TestNATSValues(t *testing.T) {
	b, err := os.ReadFile("nats-values.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var v struct {
		Config struct {
			Cluster struct {
				Enabled  bool `yaml:"enabled"`
				Replicas int  `yaml:"replicas"`
			} `yaml:"cluster"`
			JetStream struct {
				Enabled   bool `yaml:"enabled"`
				FileStore struct {
					Enabled bool `yaml:"enabled"`
					PVC     struct {
						Enabled bool   `yaml:"enabled"`
						Size    string `yaml:"size"`
					} `yaml:"pvc"`
				} `yaml:"fileStore"`
			} `yaml:"jetstream"`
			Merge struct {
				MaxPayload int `yaml:"max_payload"`
			} `yaml:"merge"`
		} `yaml:"config"`
	}
	if err := yaml.Unmarshal(b, &v); err != nil {
		t.Fatal(err)
	}
	c := v.Config
	if !c.Cluster.Enabled || c.Cluster.Replicas != 3 {
		t.Errorf("cluster %+v, want enabled with 3 replicas", c.Cluster)
	}
	if !c.JetStream.Enabled || !c.JetStream.FileStore.Enabled || !c.JetStream.FileStore.PVC.Enabled || c.JetStream.FileStore.PVC.Size == "" {
		t.Errorf("jetstream %+v, want enabled on a file store with a PVC", c.JetStream)
	}
	if c.Merge.MaxPayload < 8<<20 {
		t.Errorf("max_payload %d, want at least 8 MB as in deployments/nats/kuma.conf", c.Merge.MaxPayload)
	}
	// The manifests reach the chart's Service: release "nats", port 4222.
	for _, o := range load(t) {
		if o.Kind == "ConfigMap" && o.Data["KUMA_NATS_URL"] != "" && o.Data["KUMA_NATS_URL"] != "tls://nats:4222" {
			t.Errorf("%s: KUMA_NATS_URL %q, want the chart's service over TLS, tls://nats:4222", o, o.Data["KUMA_NATS_URL"])
		}
	}
}
