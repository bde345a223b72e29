package main

import (
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
)

// TestNATSAuthFlags runs a client command against a nats-server whose user
// may only ask for the status and read its own inbox, as in
// deployments/nats/kuma.conf: it works only with the user from the flag,
// the password from KUMA_NATS_PASSWORD and the inbox _INBOX.<user>.
// (TLS goes through the same options: internal/app's TestNATSOptions and
// deployments/nats hold them.)
func TestNATSAuthFlags(t *testing.T) {
	srv, err := server.NewServer(&server.Options{Host: "127.0.0.1", Port: -1, NoSigs: true, NoLog: true,
		Users: []*server.User{
			{Username: "ops", Password: "s3cret", Permissions: &server.Permissions{
				Publish:   &server.SubjectPermission{Allow: []string{"kuma.*.status"}},
				Subscribe: &server.SubjectPermission{Allow: []string{"_INBOX.ops.>"}},
			}},
			{Username: "svc", Password: "svc"},
		}})
	if err != nil {
		t.Fatal(err)
	}
	go srv.Start()
	if !srv.ReadyForConnections(10 * time.Second) {
		t.Fatal("nats-server not ready")
	}
	t.Cleanup(srv.Shutdown)
	// A stand-in shardnode answers the status.
	svc, err := nats.Connect(srv.ClientURL(), nats.UserInfo("svc", "svc"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(svc.Close)
	if _, err := svc.Subscribe("kuma.default.status", func(m *nats.Msg) {
		_ = m.Respond([]byte(`{"context":"default","shards":[],"nodes":[],"projections":[]}`))
	}); err != nil {
		t.Fatal(err)
	}
	if err := svc.Flush(); err != nil {
		t.Fatal(err)
	}

	env := map[string]string{"KUMA_NATS_URL": srv.ClientURL(), "KUMA_NATS_PASSWORD": "s3cret"}
	out, errs, code := runCLI(t, env, "status", "--nats-user", "ops", "--timeout", "10s")
	if code != 0 || !strings.Contains(out, `"context": "default"`) {
		t.Fatalf("status as ops: exit %d, stdout %q, stderr %q", code, out, errs)
	}
	env["KUMA_NATS_PASSWORD"] = "guess"
	if _, errs, code := runCLI(t, env, "status", "--nats-user", "ops", "--timeout", "10s"); code == 0 || !strings.Contains(errs, "Authorization Violation") {
		t.Fatalf("status with a wrong password: exit %d, stderr %q", code, errs)
	}
	for _, args := range [][]string{
		{"read", "user_1", "--nats-tls-cert", "cert.pem"},
		{"serve", "--target", "router", "--nats-tls-key", "key.pem"},
	} {
		if _, errs, code := runCLI(t, env, args...); code == 0 || !strings.Contains(errs, "go together") {
			t.Fatalf("%v: exit %d, stderr %q; want the certificate and key asked for together", args, code, errs)
		}
	}
}
