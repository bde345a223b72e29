package main

import (
	"regexp"
	"slices"
	"strings"
	"testing"
)

// The flags kuma up and kuma serve listed in their --help before their
// registration moved into the components' configs (internal/app and the
// services' RegisterFlags), taken from that code once, and those added
// since (procs-per-cpu). A flag that goes missing breaks scripts and the
// docs; a new one belongs here on purpose.
var (
	upFlagsBefore = strings.Fields(`cluster-advertise cluster-listen cluster-name console-listen context data
		durability idle-timeout insecure join keyvault log-format log-level master-key-file max-actors max-payload
		memory-limit-ratio metrics-listen nats-listen node pprof procs-per-cpu projections shards snapshot-every sync trace-stdout`)
	serveFlagsBefore = strings.Fields(`cluster-advertise cluster-listen cluster-name console-listen context data
		durability idle-timeout insecure join log-format log-level master-key-file max-actors max-payload
		memory-limit-ratio metrics-listen nats-creds nats-inbox-prefix nats-listen nats-nkey nats-password nats-tls-ca nats-tls-cert
		nats-tls-key nats-url nats-user node pprof procs-per-cpu projections shards snapshot-every sync target trace-stdout`)
)

// helpFlag is a flag's line in the flag package's usage: two spaces, a dash.
var helpFlag = regexp.MustCompile(`(?m)^  -([a-z0-9-]+)`)

func TestServerHelpListsEveryFlag(t *testing.T) {
	for _, tc := range []struct {
		cmd  string
		want []string
	}{
		{"up", upFlagsBefore},
		{"serve", serveFlagsBefore},
	} {
		_, stderr, code := runCLI(t, nil, tc.cmd, "--help")
		if code != 0 {
			t.Fatalf("kuma %s --help: exit %d, stderr %q", tc.cmd, code, stderr)
		}
		var got []string
		for _, m := range helpFlag.FindAllStringSubmatch(stderr, -1) {
			got = append(got, m[1])
		}
		if !slices.Equal(got, tc.want) {
			t.Errorf("kuma %s --help lists\n%v\nwant\n%v", tc.cmd, got, tc.want)
		}
	}
}
