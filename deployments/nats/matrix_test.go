package natsconf_test

import (
	"fmt"
	"strings"
	"testing"

	"github.com/nats-io/nats.go"
)

// users are kuma.conf's users, in the order the matrix prints them.
var users = []string{"client", "console", "ops", "follower", "router", "shardnode", "projector", "keyvault"}

// responders answer requests, so they may publish to any _INBOX.
var responders = []string{"router", "shardnode", "projector", "keyvault"}

// probe is one kind of subject and who may publish to it and subscribe to
// it; everyone else must be refused. Subjects in the context "probe" match
// the same permissions as the served context but reach no service.
type probe struct {
	kind     string
	subject  string // %s is the probing user
	pub, sub []string
}

var probes = []probe{
	{"public append", "kuma.probe.append.e1", []string{"client"}, []string{"router"}},
	{"public read", "kuma.probe.read.e1", []string{"client", "console"}, []string{"router"}},
	{"public forget", "kuma.probe.forget.e1", []string{"client"}, []string{"router"}},
	{"public query", "kuma.probe.query.entities", []string{"client", "console"}, []string{"projector"}},
	{"feed of any context", "kuma.probe.feed", []string{"client"}, []string{"router"}},
	{"feed of default", "kuma.default.feed", []string{"client", "follower"}, []string{"router"}},
	{"admin status", "kuma.probe.status", []string{"console", "ops"}, []string{"shardnode"}},
	{"admin shard migrate", "kuma.probe.shard.migrate", []string{"ops"}, []string{"shardnode"}},
	{"node status", "_kuma.probe.node.n1.status", []string{"shardnode"}, []string{"shardnode"}},
	{"admin projection rebuild", "kuma.probe.projection.rebuild.entities", []string{"ops"}, []string{"projector"}},
	{"admin projection drop", "kuma.probe.projection.drop.gone", []string{"ops"}, []string{"projector"}},
	{"stream events", "kuma.probe.events.0", []string{"shardnode"}, nil},
	{"stream forget notice", "kuma.probe.events.0.forgotten", []string{"shardnode"}, nil},
	{"internal shard", "_kuma.probe.shard.0.append.e1", []string{"router"}, []string{"shardnode"}},
	{"admin shard backup", "_kuma.probe.shard.0.backup", []string{"ops"}, []string{"shardnode"}},
	{"keyvault backup", "_kuma.keyvault.backup", []string{"ops"}, []string{"keyvault"}},
	{"keyvault tombstones", "_kuma.keyvault.tombstones", []string{"ops"}, []string{"keyvault"}},
	{"$O backup chunk", "$O.KUMA_BACKUPS.C.probe", []string{"shardnode", "keyvault"}, nil},
	{"$JS backup chunk erase", "$JS.API.STREAM.MSG.DELETE.OBJ_KUMA_BACKUPS", []string{"ops"}, nil},
	{"keyvault key", "_kuma.keyvault.key", []string{"shardnode", "projector"}, []string{"keyvault"}},
	{"keyvault shred", "_kuma.keyvault.shred", []string{"shardnode"}, []string{"keyvault"}},
	{"keyvault forgotten", "_kuma.keyvault.forgotten", []string{"shardnode", "projector"}, []string{"keyvault"}},
	{"keyvault pseudonyms", "_kuma.keyvault.pseudonyms", []string{"shardnode"}, []string{"keyvault"}},
	{"keyvault shredded", "_kuma.keyvault.shredded", []string{"keyvault"}, []string{"shardnode", "projector"}},
	{"projector status", "_kuma.probe.projector.status", []string{"shardnode"}, []string{"projector"}},
	{"projector replicas", "_kuma.probe.projector.replicas.rebuild", []string{"projector"}, []string{"projector"}},
	{"$JS stream create", "$JS.API.STREAM.CREATE.KUMA_default", []string{"shardnode"}, nil},
	{"$JS stream delete", "$JS.API.STREAM.DELETE.KUMA_default", nil, nil},
	{"$JS stream purge", "$JS.API.STREAM.PURGE.KUMA_default", nil, nil},
	{"$JS stream info", "$JS.API.STREAM.INFO.KUMA_default", []string{"ops", "shardnode", "projector"}, nil},
	{"$JS msg get", "$JS.API.STREAM.MSG.GET.KUMA_default", []string{"shardnode"}, nil},
	{"$JS consumer create", "$JS.API.CONSUMER.CREATE.KUMA_default.probe", []string{"projector"}, nil},
	{"$JS consumer list", "$JS.API.CONSUMER.LIST.KUMA_default", []string{"ops", "shardnode", "projector"}, nil}, // the shardnode: the stream format gate
	{"$JS consumer delete", "$JS.API.CONSUMER.DELETE.KUMA_default.probe", []string{"projector"}, nil},
	{"$JS consumer next", "$JS.API.CONSUMER.MSG.NEXT.KUMA_default.probe", []string{"projector"}, nil},
	{"$JS ack", "$JS.ACK.KUMA_default.probe.1.1.1.1.0", []string{"projector"}, nil},
	{"$JS other stream", "$JS.API.STREAM.CREATE.OTHER", nil, nil},
	{"$KV leases", "$KV.KUMA_LEASES.probe", []string{"shardnode"}, nil},
	{"$JS KV bucket", "$JS.API.STREAM.CREATE.KV_KUMA_LEASES", []string{"shardnode"}, nil},
	{"$O snapshots", "$O.KUMA_SNAPSHOTS.M.probe", []string{"shardnode"}, nil},
	{"$JS snapshot chunk erase", "$JS.API.STREAM.MSG.DELETE.OBJ_KUMA_SNAPSHOTS", []string{"shardnode"}, nil},
	{"$JS snapshot chunk find", "$JS.API.DIRECT.GET.OBJ_KUMA_SNAPSHOTS", []string{"shardnode"}, nil},
	{"$JS event delete", "$JS.API.STREAM.MSG.DELETE.KUMA_default", nil, nil},
	{"$KV keyvault keys", "$KV.KUMA_KEYS.k.probe.x", []string{"keyvault"}, nil},
	{"$JS keys bucket create", "$JS.API.STREAM.CREATE.KV_KUMA_KEYS", []string{"keyvault"}, nil},
	{"$JS keys bucket info", "$JS.API.STREAM.INFO.KV_KUMA_KEYS", []string{"ops", "keyvault", "shardnode"}, nil},
	{"$JS keys bucket raise", "$JS.API.STREAM.UPDATE.KV_KUMA_KEYS", []string{"shardnode"}, nil},
	{"$JS key read", "$JS.API.STREAM.MSG.GET.KV_KUMA_KEYS", []string{"keyvault"}, nil},
	{"$JS key erase", "$JS.API.STREAM.MSG.DELETE.KV_KUMA_KEYS", []string{"keyvault"}, nil},
	{"$JS keys purge", "$JS.API.STREAM.PURGE.KV_KUMA_KEYS", nil, nil},
	{"$JS keys direct get", "$JS.API.DIRECT.GET.KV_KUMA_KEYS", nil, nil},
	{"$SRV all", "$SRV.PING", []string{"ops"}, []string{"router", "shardnode", "projector", "keyvault"}},
	{"$SRV keyvault", "$SRV.INFO.kuma-keyvault", []string{"ops"}, []string{"keyvault"}},
	{"$SYS server", "$SYS.REQ.SERVER.PING", nil, nil},
	{"own inbox", "_INBOX.%s.probe", responders, users},
	{"shardnode inbox", "_INBOX.shardnode.probe", responders, []string{"shardnode"}},
	{"plain inbox", "_INBOX.probe", responders, nil},
}

// matrix checks every user against every probe, both ways, before any Kuma
// service runs (so no probe can disturb one). It returns the cells checked
// and how many of them were denied.
func (e *env) matrix(t *testing.T) (total, denied int) {
	obs, _ := e.connect(t, "observer", nats.NoEcho())
	watch := map[string]*nats.Subscription{}
	watching := func(subject string) *nats.Subscription {
		if s, ok := watch[subject]; ok {
			return s
		}
		s, err := obs.SubscribeSync(subject)
		if err != nil {
			t.Fatal(err)
		}
		if err := obs.Flush(); err != nil {
			t.Fatal(err)
		}
		watch[subject] = s
		return s
	}
	table := map[string]map[string]string{}
	for _, user := range users {
		nc, el := e.connect(t, user)
		for _, p := range probes {
			subject := p.subject
			if strings.Contains(subject, "%s") {
				subject = fmt.Sprintf(subject, user)
			}
			cell := ""
			// Publish: the observer must see it if allowed, and nothing
			// (with the violation reported to the publisher) if not.
			// verdict checks one direction: got messages crossed it.
			verdict := func(op string, allowed bool, got int) {
				switch {
				case allowed && got != 1:
					t.Errorf("%s %s %s (%s): %d messages crossed, want 1 (allowed)", user, op, subject, p.kind, got)
				case !allowed && got != 0:
					t.Errorf("%s %s %s (%s): %d messages crossed, want 0 (must be denied)", user, op, subject, p.kind, got)
				case !allowed && !el.waitFor(`permissions violation for `+op+` to "`+subject+`"`):
					t.Errorf("%s %s %s (%s): no permissions violation reported", user, op, subject, p.kind)
				}
				if !allowed {
					denied++
				}
				total++
			}
			ws := watching(subject)
			mustPub := contains(p.pub, user)
			if err := nc.Publish(subject, []byte("probe")); err != nil {
				t.Fatal(err)
			}
			flush(t, nc, obs)
			verdict("publish", mustPub, drain(t, ws))
			cell += cellMark(mustPub, "P")
			// Subscribe: an allowed subscriber gets the observer's message,
			// a refused one gets nothing and is told.
			mustSub := contains(p.sub, user)
			s, err := nc.SubscribeSync(subject)
			if err != nil {
				t.Fatal(err)
			}
			flush(t, nc)
			if err := obs.Publish(subject, []byte("probe")); err != nil {
				t.Fatal(err)
			}
			flush(t, obs, nc)
			verdict("subscription", mustSub, drain(t, s))
			_ = s.Unsubscribe()
			cell += cellMark(mustSub, "S")
			if table[p.kind] == nil {
				table[p.kind] = map[string]string{}
			}
			table[p.kind][user] = cell
		}
	}
	var b strings.Builder
	fmt.Fprintf(&b, "permission matrix (P publish, S subscribe allowed; - denied):\n%-26s", "subject kind")
	for _, u := range users {
		fmt.Fprintf(&b, " %-10s", u)
	}
	for _, p := range probes {
		fmt.Fprintf(&b, "\n%-26s", p.kind)
		for _, u := range users {
			fmt.Fprintf(&b, " %-10s", table[p.kind][u])
		}
	}
	t.Log(b.String())
	return total, denied
}

func cellMark(allowed bool, letter string) string {
	if allowed {
		return letter
	}
	return "-"
}
