// Package k8s checks Kuma's Kubernetes manifests without a cluster: every
// YAML document parses, has the fields its kind requires, and what one
// object names exists among the others (the pods a Service or a
// PodDisruptionBudget selects, the Secrets and ConfigMaps a pod uses, the
// ports its probes call, the StatefulSet's headless Service). The checker
// is also run on broken copies, each of which it must reject.
package k8s

import (
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/kumadb/kuma/internal/app"
	"go.yaml.in/yaml/v3"
)

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
