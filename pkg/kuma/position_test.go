package kuma_test

import (
	"math"
	"strings"
	"testing"

	"github.com/kumadb/kuma/pkg/kuma"
)

func TestPositionString(t *testing.T) {
	tests := []struct {
		p    kuma.Position
		want string
	}{
		{kuma.Position{Shard: 3, Seq: 1042}, "p1.3.1042"},
		{kuma.Position{Shard: 0, Seq: 1}, "p1.0.1"},
		{kuma.Position{Shard: 255, Seq: math.MaxInt64}, "p1.255.9223372036854775807"},
	}
	for _, tc := range tests {
		if got := tc.p.String(); got != tc.want {
			t.Errorf("%#v.String(): got %q, want %q", tc.p, got, tc.want)
		}
	}
}

func TestPositionRoundTrip(t *testing.T) {
	positions := []kuma.Position{
		{Shard: 0, Seq: 1},
		{Shard: 0, Seq: 2},
		{Shard: 1, Seq: 1},
		{Shard: 3, Seq: 1042},
		{Shard: 15, Seq: 999999},
		{Shard: 1023, Seq: 1 << 40},
		{Shard: math.MaxInt32, Seq: math.MaxInt64},
	}
	for _, p := range positions {
		t.Run(p.String(), func(t *testing.T) {
			got, err := kuma.ParsePosition(p.String())
			if err != nil {
				t.Fatalf("ParsePosition(%q): got %v, want nil", p.String(), err)
			}
			if got != p {
				t.Fatalf("ParsePosition(%q): got %#v, want %#v", p.String(), got, p)
			}
			if got.String() != p.String() {
				t.Fatalf("String after round trip: got %q, want %q", got.String(), p.String())
			}
		})
	}
}

func TestParsePositionRejects(t *testing.T) {
	for _, s := range []string{
		"",
		"p1",
		"p1.",
		"p1..",
		"p1.3",
		"p1.3.",
		"p1..5",
		"p1.3.0",  // sequences start at 1
		"p1.3.-1", // negative sequence
		"p1.-1.5", // negative shard
		"p1.3.5.7",
		"p1.3.5.",
		"p1.a.5",
		"p1.3.b",
		"p1.3.5x",
		"p1.3.0x10",
		"p1.3.1e3",
		"p1.3.1.5",
		"p1. 3.5",
		"p1.3.5 ",
		" p1.3.5",
		"p1.3.5\n",
		"p2.3.5", // unknown version
		"P1.3.5",
		"p13.5",
		"3.5",
		"p1.3.9223372036854775808",     // int64 overflow
		"p1.99999999999999999999.1",    // int overflow
		"p1.3.18446744073709551616",    // uint64 overflow
		"p1.٣.٥",                       // non-ASCII digits
		"kuma.default.events.3",        // a subject, not a position
		strings.Repeat("p1.3.5", 1000), // hostile length
	} {
		t.Run(s[:min(len(s), 40)], func(t *testing.T) {
			p, err := kuma.ParsePosition(s)
			if err == nil {
				t.Fatalf("ParsePosition(%q): got %#v, want an error", s, p)
			}
			kerr := requireCode(t, err, kuma.CodeBadRequest)
			if len(kerr.Message) > 200 {
				t.Fatalf("got a %d-byte message, want a short one", len(kerr.Message))
			}
			if p != (kuma.Position{}) {
				t.Fatalf("got %#v with the error, want the zero Position", p)
			}
		})
	}
}

// Tokens that Position.String never makes. strconv accepts a sign and leading
// zeros, so ParsePosition takes these as aliases of canonical tokens.
func TestParsePositionRejectsNonCanonical(t *testing.T) {

	for _, s := range []string{"p1.+3.5", "p1.3.+5", "p1.03.5", "p1.3.05", "p1.-0.5", "p1.00.1"} {
		if p, err := kuma.ParsePosition(s); err == nil {
			t.Errorf("ParsePosition(%q): got %#v, want an error", s, p)
		}
	}
}

// Whatever ParsePosition accepts must print back as a token that parses to the
// same position, and a refused token must be bad_request.
func FuzzParsePosition(f *testing.F) {
	for _, s := range []string{"p1.3.1042", "p1.0.1", "p1.3.0", "p1.-1.5", "p1.+3.05", "", "p1..", "p1.3.9223372036854775807"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		p, err := kuma.ParsePosition(s)
		if err != nil {
			requireCode(t, err, kuma.CodeBadRequest)
			return
		}
		if p.Shard < 0 || p.Seq < 1 {
			t.Fatalf("ParsePosition(%q): got %#v, want shard >= 0 and seq >= 1", s, p)
		}
		again, err := kuma.ParsePosition(p.String())
		if err != nil || again != p {
			t.Fatalf("ParsePosition(%q) = %#v, but ParsePosition(%q): got (%#v, %v), want (%#v, nil)", s, p, p.String(), again, err, p)
		}
	})
}
