package app

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kumadb/kuma/pkg/cluster"
	"github.com/kumadb/kuma/pkg/natsbus"
	"github.com/nats-io/nats.go"
)

// TestNATSOptions holds the NATS credential and TLS fields to what they
// promise: the options nats.go gets, and every mistake refused with its
// fix before a connection is tried. The whole path, against a real
// nats-server run from deployments/nats/kuma.conf, is
// deployments/nats/security_test.go.
func TestNATSOptions(t *testing.T) {
	dir := t.TempDir()
	cert, key := selfSigned(t, dir)
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	notPEM := write("not.pem", "hello")
	notCreds := write("not.creds", "hello")
	notSeed := write("not.nk", "SUNOTASEED")
	missing := filepath.Join(dir, "missing.pem")

	for _, tc := range []struct {
		name  string
		cfg   Config
		want  string // in the error; "" means no error
		check func(t *testing.T, o nats.Options)
	}{
		{name: "nothing set", check: func(t *testing.T, o nats.Options) {
			if o.User != "" || o.Secure || o.InboxPrefix != "" {
				t.Errorf("options changed: user %q secure %v inbox %q", o.User, o.Secure, o.InboxPrefix)
			}
		}},
		{name: "user, password and TLS", cfg: Config{NATSUser: "router", NATSPassword: "pw", NATSTLSCA: cert, NATSTLSCert: cert, NATSTLSKey: key},
			check: func(t *testing.T, o nats.Options) {
				if o.User != "router" || o.Password != "pw" {
					t.Errorf("user %q password %q, want router pw", o.User, o.Password)
				}
				if !o.Secure || o.TLSConfig == nil || len(o.TLSConfig.Certificates) != 1 || o.TLSConfig.RootCAs == nil {
					t.Errorf("TLS: secure %v config %+v, want the CA and one client certificate", o.Secure, o.TLSConfig)
				}
				if o.InboxPrefix != "_INBOX.router" {
					t.Errorf("inbox prefix %q, want _INBOX.router (kuma.conf lets a user read only its own)", o.InboxPrefix)
				}
			}},
		{name: "a user name that is no subject token keeps nats.go's inbox", cfg: Config{NATSUser: "a.b@c"},
			check: func(t *testing.T, o nats.Options) {
				if o.InboxPrefix != "_INBOX" {
					t.Errorf("inbox prefix %q, want _INBOX", o.InboxPrefix)
				}
			}},
		{name: "an inbox prefix given", cfg: Config{NATSUser: "client", NATSInboxPrefix: "_INBOX.app-7"},
			check: func(t *testing.T, o nats.Options) {
				if o.InboxPrefix != "_INBOX.app-7" {
					t.Errorf("inbox prefix %q, want _INBOX.app-7", o.InboxPrefix)
				}
			}},
		{name: "a wildcard inbox prefix", cfg: Config{NATSInboxPrefix: "_INBOX.>"}, want: "--nats-inbox-prefix"},
		{name: "password without user", cfg: Config{NATSPassword: "pw"}, want: "needs --nats-user"},
		{name: "two ways to authenticate", cfg: Config{NATSUser: "u", NATSNKeyFile: notSeed}, want: "give one of"},
		{name: "creds file missing", cfg: Config{NATSCredsFile: missing}, want: "--nats-creds"},
		{name: "creds file of something else", cfg: Config{NATSCredsFile: notCreds}, want: "not a NATS credentials file"},
		{name: "nkey file not a seed", cfg: Config{NATSNKeyFile: notSeed}, want: "--nats-nkey"},
		{name: "CA file missing", cfg: Config{NATSTLSCA: missing}, want: "--nats-tls-ca"},
		{name: "CA file without a certificate", cfg: Config{NATSTLSCA: notPEM}, want: "holds no PEM certificate"},
		{name: "certificate without key", cfg: Config{NATSTLSCert: cert}, want: "go together"},
		{name: "key that is not the certificate's", cfg: Config{NATSTLSCert: cert, NATSTLSKey: notPEM}, want: "--nats-tls-cert/--nats-tls-key"},
		{name: "every mistake at once", cfg: Config{NATSPassword: "pw", NATSTLSCA: missing, NATSTLSCert: cert},
			want: "needs --nats-user|--nats-tls-ca|go together"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			opts, err := tc.cfg.NATSOptions()
			if tc.want != "" {
				if err == nil {
					t.Fatalf("no error, want one about %q", tc.want)
				}
				for _, w := range strings.Split(tc.want, "|") {
					if !strings.Contains(err.Error(), w) {
						t.Errorf("error %q does not say %q", err, w)
					}
				}
				// Validate refuses it too, and a connection would fail the same.
				cfg := tc.cfg
				cfg.setDefaults()
				cfg.Target = ModuleRouter
				if verr := cfg.Validate(); verr == nil || !strings.Contains(verr.Error(), strings.Split(tc.want, "|")[0]) {
					t.Errorf("Validate: %v, want the same error", verr)
				}
				o := nats.GetDefaultOptions()
				if aerr := cfg.natsAuth()(&o); aerr == nil {
					t.Error("natsAuth applied without an error")
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			o := nats.GetDefaultOptions()
			for _, opt := range opts {
				if err := opt(&o); err != nil {
					t.Fatal(err)
				}
			}
			tc.check(t, o)
		})
	}
}

func TestNATSAuthNotForTheEmbeddedServer(t *testing.T) {
	cfg := Config{NATSUser: "client", NATSPassword: "pw"}
	cfg.setDefaults()
	err := cfg.Validate()
	if err == nil || !strings.Contains(err.Error(), "embedded NATS server") {
		t.Fatalf("target all with NATS credentials: %v, want a refusal naming the embedded server", err)
	}
}

// selfSigned writes a self-signed certificate and its key.
func selfSigned(t *testing.T, dir string) (cert, key string) {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "kuma"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalECPrivateKey(k)
	if err != nil {
		t.Fatal(err)
	}
	cert, key = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	if err := os.WriteFile(cert, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(key, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder}), 0o600); err != nil {
		t.Fatal(err)
	}
	return cert, key
}

func TestNodeNameFromHost(t *testing.T) {
	for host, want := range map[string]string{
		"laptop":                   "laptop",
		"ip-10-0-0-7.ec2.internal": "ip-10-0-0-7",
		"kuma-0.kuma.default.svc":  "kuma-0",
		"_weird+host":              "xweird-host",
		"":                         "kuma",
	} {
		got := cluster.NodeNameFromHost(host)
		if got != want {
			t.Errorf("NodeNameFromHost(%q) = %q, want %q", host, got, want)
		}
		if err := cluster.ValidateNode(got); err != nil {
			t.Errorf("NodeNameFromHost(%q) = %q is not a valid node name: %v", host, got, err)
		}
	}
	c := Config{NodeName: "bad.name"}
	c.setDefaults()
	if err := c.Validate(); err == nil || !strings.Contains(err.Error(), "--node") {
		t.Fatalf("Validate with node bad.name = %v, want a --node error", err)
	}
}

func TestDurabilityIsChecked(t *testing.T) {
	for _, d := range []string{"", "local", "replicated"} {
		c := Config{Durability: d}
		c.setDefaults()
		if err := c.Validate(); err != nil {
			t.Errorf("durability %q: %v", d, err)
		}
	}
	c := Config{Durability: "sometimes"}
	c.setDefaults()
	if err := c.Validate(); err == nil || !strings.Contains(err.Error(), "--durability must be local or replicated") {
		t.Fatalf("durability sometimes: %v, want the --durability error", err)
	}
}

func TestMaxPayloadIsChecked(t *testing.T) {
	for _, tc := range []struct {
		target string
		max    int32
		want   string // "" for valid
	}{
		{TargetAll, 0, ""},
		{TargetAll, MinMaxPayload, ""},
		{TargetAll, MaxMaxPayload, ""},
		{TargetAll, MinMaxPayload - 1, "--max-payload must be"},
		{TargetAll, MaxMaxPayload + 1, "--max-payload must be"},
		{TargetNATS, 1 << 20, ""},
		{ModuleRouter, 1 << 20, "which target router does not run"},
	} {
		c := Config{Target: tc.target, NATS: natsbus.ServerConfig{MaxPayload: tc.max}, MasterKey: make([]byte, 32)}
		c.setDefaults()
		err := c.Validate()
		if tc.want == "" && err != nil || tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)) {
			t.Errorf("target %s max payload %d: Validate = %v, want %q", tc.target, tc.max, err, tc.want)
		}
	}
}
