package k8s

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/nats-io/nats-server/v2/conf"
	"go.yaml.in/yaml/v3"
	corev1 "k8s.io/api/core/v1"
)

// natsSecurity returns what is missing from the NATS chart's values for a
// server a cluster admin would run: TLS for clients (verifying their
// certificates) and for routes, and users with passwords that come from
// the environment (so from a Secret, not from the values) and the rights
// deployments/nats/kuma.conf gives them.
func natsSecurity(values map[string]any, wantUsers map[string]any) []string {
	var errs []string
	get := func(path string) any { return valueAt(values, path) }
	for _, block := range []string{"config.nats.tls", "config.cluster.tls"} {
		if get(block+".enabled") != true || get(block+".secretName") == nil {
			errs = append(errs, block+": TLS is not enabled with a secretName")
		}
		if get(block+".ca") == nil {
			errs = append(errs, block+": no ca, so the server does not verify its peers' certificates")
		}
	}
	users, _ := get("config.merge.authorization.users").([]any)
	if len(users) == 0 {
		return append(errs, "config.merge.authorization: no users, so NATS takes anyone")
	}
	env, _ := get("container.env").(map[string]any)
	passwordRef := regexp.MustCompile(`^<< \$([A-Z0-9_]+) >>$`)
	got := map[string]any{}
	for _, u := range users {
		m, _ := u.(map[string]any)
		name, _ := m["user"].(string)
		pw, _ := m["password"].(string)
		got[name] = m["permissions"]
		ref := passwordRef.FindStringSubmatch(pw)
		if ref == nil {
			errs = append(errs, fmt.Sprintf("user %s: password %q is not << $VAR >> from the environment", name, pw))
			continue
		}
		e, _ := env[ref[1]].(map[string]any)
		from, _ := e["valueFrom"].(map[string]any)
		if _, ok := from["secretKeyRef"]; !ok {
			errs = append(errs, fmt.Sprintf("user %s: container.env %s does not come from a secretKeyRef", name, ref[1]))
		}
	}
	// Compare as JSON, so YAML's and the NATS parser's types agree.
	norm := func(v any) string { b, _ := json.Marshal(v); return string(b) }
	for name, perms := range wantUsers {
		if g, ok := got[name]; !ok {
			errs = append(errs, fmt.Sprintf("user %s of kuma.conf is missing", name))
		} else if norm(g) != norm(perms) {
			errs = append(errs, fmt.Sprintf("user %s: permissions %s, kuma.conf gives %s", name, norm(g), norm(perms)))
		}
	}
	for name := range got {
		if _, ok := wantUsers[name]; !ok {
			errs = append(errs, fmt.Sprintf("user %s is not in kuma.conf", name))
		}
	}
	return errs
}

// kumaConfUsers parses deployments/nats/kuma.conf with nats-server's own
// parser (its $VARs set to placeholders) and returns each user's rights.
func kumaConfUsers(t *testing.T) map[string]any {
	t.Helper()
	b, err := os.ReadFile("../nats/kuma.conf")
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range regexp.MustCompile(`\$(KUMA_NATSD_[A-Z_]+)`).FindAllStringSubmatch(string(b), -1) {
		t.Setenv(m[1], "x")
	}
	t.Setenv("KUMA_NATSD_ROUTES", "[]")
	c, err := conf.Parse(string(b))
	if err != nil {
		t.Fatalf("kuma.conf: %v", err)
	}
	authz, _ := c["authorization"].(map[string]any)
	users, _ := authz["users"].([]any)
	out := map[string]any{}
	for _, u := range users {
		m := u.(map[string]any)
		out[m["user"].(string)] = m["permissions"]
	}
	if len(out) == 0 {
		t.Fatal("kuma.conf has no users")
	}
	return out
}

func natsValues(t *testing.T) map[string]any {
	t.Helper()
	b, err := os.ReadFile("nats-values.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var v map[string]any
	if err := yaml.Unmarshal(b, &v); err != nil {
		t.Fatal(err)
	}
	return v
}

func TestNATSValuesSecured(t *testing.T) {
	want := kumaConfUsers(t)
	for _, p := range natsSecurity(natsValues(t), want) {
		t.Error(p)
	}
	// Each Kuma workload connects as a user the servers know, with its
	// password from the Secret the chart reads it from.
	for _, w := range workloads(decodeStrict(t)) {
		for _, c := range w.pod.Spec.Containers {
			i := slices.IndexFunc(c.Env, func(e corev1.EnvVar) bool { return e.Name == "KUMA_NATS_USER" })
			if i < 0 {
				t.Errorf("%s: container %s has no KUMA_NATS_USER", w.name, c.Name)
				continue
			}
			user := c.Env[i].Value
			if _, ok := want[user]; !ok {
				t.Errorf("%s: KUMA_NATS_USER %q is not a user of kuma.conf", w.name, user)
			}
			j := slices.IndexFunc(c.Env, func(e corev1.EnvVar) bool { return e.Name == "KUMA_NATS_PASSWORD" })
			if j < 0 || c.Env[j].ValueFrom == nil || c.Env[j].ValueFrom.SecretKeyRef == nil ||
				c.Env[j].ValueFrom.SecretKeyRef.Name != "kuma-nats-users" || c.Env[j].ValueFrom.SecretKeyRef.Key != user {
				t.Errorf("%s: KUMA_NATS_PASSWORD is not key %q of Secret kuma-nats-users", w.name, user)
			}
		}
	}
}

// TestNATSSecurityCatches breaks copies of the values once per rule.
func TestNATSSecurityCatches(t *testing.T) {
	want := kumaConfUsers(t)
	users := func(v map[string]any) []any { return mapAt(v, "config.merge.authorization")["users"].([]any) }
	valuesCatch(t, []brokenValues{
		{"no client TLS", func(v map[string]any) { delete(mapAt(v, "config.nats"), "tls") }, "config.nats.tls: TLS is not enabled"},
		{"client certificates not verified", func(v map[string]any) { delete(mapAt(v, "config.nats.tls"), "ca") }, "config.nats.tls: no ca"},
		{"routes in clear", func(v map[string]any) { mapAt(v, "config.cluster.tls")["enabled"] = false }, "config.cluster.tls: TLS is not enabled"},
		{"no users", func(v map[string]any) { delete(mapAt(v, "config.merge"), "authorization") }, "no users"},
		{"a password in the values", func(v map[string]any) {
			users(v)[0].(map[string]any)["password"] = "hunter2"
		}, `password "hunter2" is not`},
		{"a password not from a Secret", func(v map[string]any) {
			mapAt(v, "container.env")["KUMA_NATSD_ROUTER_PASSWORD"] = map[string]any{"value": "x"}
		}, "KUMA_NATSD_ROUTER_PASSWORD does not come from a secretKeyRef"},
		{"a right more than kuma.conf's", func(v map[string]any) {
			u := users(v)[0].(map[string]any)
			p := mapAt(u, "permissions.publish")
			p["allow"] = append(slices.Clone(p["allow"].([]any)), ">")
		}, "kuma.conf gives"},
		{"a user missing", func(v map[string]any) {
			mapAt(v, "config.merge.authorization")["users"] = users(v)[1:]
		}, "of kuma.conf is missing"},
	}, func(v map[string]any) []string { return natsSecurity(v, want) })
}

// TestOperatorSecretsDocumented: every Secret the manifests and the values
// use without shipping it has its kubectl command in docs/deployment.md,
// naming every key the manifests read.
func TestOperatorSecretsDocumented(t *testing.T) {
	b, err := os.ReadFile("../../docs/deployment.md")
	if err != nil {
		t.Fatal(err)
	}
	doc := string(b)
	for name, keys := range operatorSecrets {
		i := strings.Index(doc, "create secret generic "+name)
		if i < 0 {
			t.Errorf("docs/deployment.md has no `kubectl create secret generic %s`", name)
			continue
		}
		cmd := doc[i:]
		if end := strings.Index(cmd, "\n\n"); end > 0 {
			cmd = cmd[:end]
		}
		if end := strings.Index(cmd, "```"); end > 0 {
			cmd = cmd[:end]
		}
		for _, k := range keys {
			if !strings.Contains(cmd, k+"=") {
				t.Errorf("docs/deployment.md: the command creating %s does not set key %s:\n%s", name, k, cmd)
			}
		}
	}
	if !reflect.DeepEqual(sortedKeys(operatorSecrets["kuma-nats-users"]), sortedKeys(mapKeys(kumaConfUsers(t)))) {
		t.Errorf("kuma-nats-users keys %v, kuma.conf users %v", operatorSecrets["kuma-nats-users"], mapKeys(kumaConfUsers(t)))
	}
}

func mapKeys(m map[string]any) []string {
	var ks []string
	for k := range m {
		ks = append(ks, k)
	}
	return ks
}

func sortedKeys(s []string) []string { s = slices.Clone(s); slices.Sort(s); return s }

// natsPod builds the NATS server's pod as the chart's merges shape it
// (podTemplate.merge.spec, container.merge, reloader.merge), strictly
// decoded into the Kubernetes types, so that Kuma's own pod rules apply.
func natsPod(v map[string]any) (*corev1.PodSpec, error) {
	at := func(path string) any { return valueAt(v, path) }
	strict := func(src any, dst any) error {
		b, err := json.Marshal(src)
		if err != nil {
			return err
		}
		d := json.NewDecoder(bytes.NewReader(b))
		d.DisallowUnknownFields()
		return d.Decode(dst)
	}
	var ps corev1.PodSpec
	if err := strict(at("podTemplate.merge.spec"), &ps); err != nil {
		return nil, fmt.Errorf("podTemplate.merge.spec: %w", err)
	}
	for _, c := range []struct{ name, path string }{{"nats", "container.merge"}, {"reloader", "reloader.merge"}} {
		var ct corev1.Container
		if err := strict(at(c.path), &ct); err != nil {
			return nil, fmt.Errorf("%s: %w", c.path, err)
		}
		ct.Name = c.name
		ps.Containers = append(ps.Containers, ct)
	}
	return &ps, nil
}

// natsPodPolicy holds the NATS servers to the rules of Kuma's own pods:
// Pod Security "restricted", requests and limits, and (three servers)
// spread over machines.
func natsPodPolicy(v map[string]any) []string {
	var errs []string
	bad := func(who, format string, args ...any) { errs = append(errs, who+": "+fmt.Sprintf(format, args...)) }
	ps, err := natsPod(v)
	if err != nil {
		return []string{err.Error()}
	}
	restricted("NATS", ps, bad)
	bounded("NATS", ps, bad)
	if !spreadOverHosts(ps, natsPods) {
		bad("NATS", "no topology spread or anti-affinity over kubernetes.io/hostname selecting the chart's pods %v: all three servers may land on one machine", natsPods)
	}
	return errs
}

func TestNATSValuesPodPolicy(t *testing.T) {
	for _, p := range natsPodPolicy(natsValues(t)) {
		t.Error(p)
	}
}

// TestNATSPodPolicyCatches breaks copies of the values once per rule.
func TestNATSPodPolicyCatches(t *testing.T) {
	valuesCatch(t, []brokenValues{
		{"root allowed", func(v map[string]any) { delete(mapAt(v, "podTemplate.merge.spec.securityContext"), "runAsNonRoot") }, "runAsNonRoot is not true"},
		{"no seccomp", func(v map[string]any) { delete(mapAt(v, "podTemplate.merge.spec.securityContext"), "seccompProfile") }, "seccompProfile"},
		{"escalation", func(v map[string]any) { mapAt(v, "container.merge.securityContext")["allowPrivilegeEscalation"] = true }, "container nats: allowPrivilegeEscalation"},
		{"capabilities kept", func(v map[string]any) { delete(mapAt(v, "reloader.merge.securityContext"), "capabilities") }, "container reloader: capabilities.drop"},
		{"no limits", func(v map[string]any) { delete(mapAt(v, "reloader.merge.resources"), "limits") }, "container reloader has no cpu request and limit"},
		{"no spread", func(v map[string]any) { delete(mapAt(v, "podTemplate.merge.spec"), "topologySpreadConstraints") }, "may land on one machine"},
		{"spread of other pods", func(v map[string]any) {
			c := mapAt(v, "podTemplate.merge.spec")["topologySpreadConstraints"].([]any)[0].(map[string]any)
			c["labelSelector"] = map[string]any{"matchLabels": map[string]any{"app": "other"}}
		}, "may land on one machine"},
		{"a field Kubernetes does not have", func(v map[string]any) { mapAt(v, "container.merge")["securityContxt"] = map[string]any{} }, "unknown field"},
	}, natsPodPolicy)
}

// valueAt is the value at a dotted path of the chart's values (nil where
// the path does not lead).
func valueAt(values map[string]any, path string) any {
	var v any = values
	for _, k := range strings.Split(path, ".") {
		m, ok := v.(map[string]any)
		if !ok {
			return nil
		}
		v = m[k]
	}
	return v
}

// mapAt is the map at a dotted path, for the tests that break a copy there.
func mapAt(v map[string]any, path string) map[string]any {
	for _, k := range strings.Split(path, ".") {
		v = v[k].(map[string]any)
	}
	return v
}

// brokenValues breaks a copy of the values in one way, which a check must
// report with want.
type brokenValues struct {
	name   string
	break_ func(map[string]any)
	want   string
}

// valuesCatch runs check on a fresh copy of the values broken by each case.
func valuesCatch(t *testing.T, cases []brokenValues, check func(map[string]any) []string) {
	t.Helper()
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			v := natsValues(t) // a fresh copy each time
			tc.break_(v)
			problems := check(v)
			if !slices.ContainsFunc(problems, func(p string) bool { return strings.Contains(p, tc.want) }) {
				t.Fatalf("problems %q do not report %q", problems, tc.want)
			}
		})
	}
}
