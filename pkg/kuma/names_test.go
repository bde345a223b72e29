package kuma_test

import (
	"errors"
	"math/rand/v2"
	"regexp"
	"strings"
	"testing"

	"github.com/kumadb/kuma/pkg/kuma"
)

// The name rules exactly as PROTOCOL.md writes them. The validators are written
// by hand for speed; these are the reference they must agree with.
var (
	protocolContextRe   = regexp.MustCompile(`^[a-z0-9][a-z0-9_-]{0,31}$`)
	protocolEntityIDRe  = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_:=@-]{0,127}$`)
	protocolEventTypeRe = regexp.MustCompile(`^[A-Za-z][A-Za-z0-9_.:-]{0,127}$`)
)

// requireCode fails the test unless err is a *kuma.Error with the given code.
func requireCode(t *testing.T, err error, want kuma.Code) *kuma.Error {
	t.Helper()
	if err == nil {
		t.Fatalf("got nil error, want code %q", want)
	}
	var kerr *kuma.Error
	if !errors.As(err, &kerr) {
		t.Fatalf("got error %T %v, want a *kuma.Error with code %q", err, err, want)
	}
	if kerr.Code != want {
		t.Fatalf("got code %q (%v), want %q", kerr.Code, err, want)
	}
	return kerr
}

type nameCase struct {
	name  string
	input string
	ok    bool
}

func TestValidateContext(t *testing.T) {
	tests := []nameCase{
		{"default", "default", true},
		{"seed payments", "payments", true},
		{"single lower", "a", true},
		{"single digit", "0", true},
		{"digit first", "9lives", true},
		{"underscore inside", "a_b", true},
		{"hyphen inside", "a-b", true},
		{"trailing underscore", "a_", true},
		{"trailing hyphen", "a-", true},
		{"all punctuation after first", "a_-_-", true},
		{"length 32", strings.Repeat("a", 32), true},
		{"length 32 mixed", "z9" + strings.Repeat("_-", 15), true},

		{"empty", "", false},
		{"length 33", strings.Repeat("a", 33), false},
		{"very long", strings.Repeat("a", 1000), false},
		{"upper first", "Default", false},
		{"upper inside", "defaUlt", false},
		{"underscore first", "_a", false},
		{"hyphen first", "-a", false},
		{"dot", "a.b", false},
		{"star", "a*", false},
		{"gt", "a>", false},
		{"lone star", "*", false},
		{"lone gt", ">", false},
		{"space", "a b", false},
		{"leading space", " a", false},
		{"trailing newline", "a\n", false},
		{"tab", "a\tb", false},
		{"colon", "a:b", false},
		{"equals", "a=b", false},
		{"at", "a@b", false},
		{"slash", "a/b", false},
		{"unicode", "café", false},
		{"unicode first", "écoute", false},
		{"nul byte", "a\x00", false},
		{"invalid utf8", "a\xff", false},
		{"backtick (before a)", "`", false},
		{"brace (after z)", "a{", false},
		{"slash (before 0)", "/", false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := kuma.ValidateContext(tc.input)
			if tc.ok {
				if err != nil {
					t.Fatalf("ValidateContext(%q): got %v, want nil", tc.input, err)
				}
				return
			}
			requireCode(t, err, kuma.CodeBadRequest)
		})
	}
}

func TestValidateEntityID(t *testing.T) {
	tests := []nameCase{
		{"README example", "user_0x9A4F", true},
		{"single lower", "a", true},
		{"single upper", "Z", true},
		{"single digit", "7", true},
		{"underscore", "a_b", true},
		{"colon", "order:7731", true},
		{"equals", "k=v", true},
		{"at", "alice@example", true},
		{"hyphen", "a-b", true},
		{"every punctuation", "x_:=@-", true},
		{"trailing punctuation", "a-", true},
		{"upper and lower", "AbCdEf", true},
		{"length 128", strings.Repeat("x", 128), true},
		{"length 128 mixed", "A" + strings.Repeat("_:=@-9z", 18) + "z", true},

		{"empty", "", false},
		{"length 129", strings.Repeat("x", 129), false},
		{"very long", strings.Repeat("x", 10000), false},
		{"underscore first", "_a", false},
		{"colon first", ":a", false},
		{"equals first", "=a", false},
		{"at first", "@a", false},
		{"hyphen first", "-a", false},
		{"dot", "a.b", false},
		{"trailing dot", "a.", false},
		{"star", "a*", false},
		{"gt", "a>", false},
		{"lone star", "*", false},
		{"lone gt", ">", false},
		{"space", "a b", false},
		{"trailing space", "a ", false},
		{"trailing newline", "a\n", false},
		{"tab", "a\tb", false},
		{"slash", "a/b", false},
		{"plus", "a+b", false},
		{"hash", "a#b", false},
		{"semicolon (after :)", "a;b", false},
		{"bracket (after Z)", "a[", false},
		{"backtick (before a)", "a`", false},
		{"brace (after z)", "a{", false},
		{"unicode", "zoë", false},
		{"unicode first", "Ünter", false},
		{"nul byte", "a\x00b", false},
		{"invalid utf8", "a\xc3", false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := kuma.ValidateEntityID(tc.input)
			if tc.ok {
				if err != nil {
					t.Fatalf("ValidateEntityID(%q): got %v, want nil", tc.input, err)
				}
				return
			}
			requireCode(t, err, kuma.CodeInvalidEntityID)
		})
	}
}

func TestValidateEventType(t *testing.T) {
	tests := []nameCase{
		{"README example", "UserCreated", true},
		{"single lower", "a", true},
		{"single upper", "Z", true},
		{"digits after first", "V2", true},
		{"underscore", "user_created", true},
		{"dot", "user.created", true},
		{"colon", "billing:Invoiced", true},
		{"hyphen", "user-created", true},
		{"every punctuation", "x_.:-", true},
		{"trailing dot", "a.", true},
		{"length 128", strings.Repeat("E", 128), true},
		{"length 128 mixed", "e" + strings.Repeat("_.:-9Z", 21) + "z", true},

		{"empty", "", false},
		{"length 129", strings.Repeat("E", 129), false},
		{"very long", strings.Repeat("E", 10000), false},
		{"digit first", "1Created", false},
		{"underscore first", "_a", false},
		{"dot first", ".a", false},
		{"colon first", ":a", false},
		{"hyphen first", "-a", false},
		{"equals (allowed in ids, not types)", "a=b", false},
		{"at (allowed in ids, not types)", "a@b", false},
		{"star", "a*", false},
		{"gt", "a>", false},
		{"space", "User Created", false},
		{"trailing newline", "Created\n", false},
		{"slash", "a/b", false},
		{"unicode", "Créé", false},
		{"nul byte", "A\x00", false},
		{"invalid utf8", "A\xff", false},
		{"bracket (after Z)", "A[", false},
		{"backtick (before a)", "A`", false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := kuma.ValidateEventType(tc.input)
			if tc.ok {
				if err != nil {
					t.Fatalf("ValidateEventType(%q): got %v, want nil", tc.input, err)
				}
				return
			}
			requireCode(t, err, kuma.CodeInvalidEvent)
		})
	}
}

// A hostile id must not fill error messages and logs.
func TestValidateEntityIDTruncatesMessage(t *testing.T) {
	id := "a" + strings.Repeat("b", 100) + "." // 102 bytes, bad character last
	kerr := requireCode(t, kuma.ValidateEntityID(id), kuma.CodeInvalidEntityID)
	if strings.Contains(kerr.Message, id) {
		t.Fatalf("got message %q, want the id truncated", kerr.Message)
	}
	if len(kerr.Message) > 200 {
		t.Fatalf("got a %d-byte message, want it short", len(kerr.Message))
	}
}

// nameAlphabet holds every character the rules allow plus the ones around the
// edges of each class and the ones NATS gives meaning to.
var nameAlphabet = []string{
	"a", "b", "m", "z", "A", "M", "Z", "0", "5", "9",
	"_", "-", ":", "=", "@", ".",
	"*", ">", " ", "\t", "\n", "\x00", "/", "`", "{", "[", ";", "+", "#", "$", "~",
	"é", "Ω", "\xff", "\u00a0",
}

// randomName builds a string of n pieces drawn from nameAlphabet, biased
// towards allowed characters so that long valid names come up too.
func randomName(r *rand.Rand, n int) string {
	var b strings.Builder
	for range n {
		if r.IntN(4) > 0 {
			b.WriteString(nameAlphabet[r.IntN(16)]) // letters, digits, punctuation
		} else {
			b.WriteString(nameAlphabet[r.IntN(len(nameAlphabet))])
		}
	}
	return b.String()
}

// nameCorpus is a deterministic set of strings around every length limit.
func nameCorpus() []string {
	r := rand.New(rand.NewPCG(7386, 2026))
	var out []string
	for _, n := range []int{0, 1, 2, 3, 31, 32, 33, 127, 128, 129, 200} {
		for range 300 {
			out = append(out, randomName(r, n))
		}
	}
	for range 20000 {
		out = append(out, randomName(r, r.IntN(140)))
	}
	// Strings made only of allowed characters, so the length limits are hit
	// by otherwise valid names.
	for _, n := range []int{1, 31, 32, 33, 127, 128, 129} {
		for _, first := range []string{"a", "Z", "0", "_", "-", ":", "=", "@", "."} {
			out = append(out, first+strings.Repeat("a", n-1))
		}
	}
	return out
}

// nearValidCorpus builds strings from the characters a rule allows, each with
// a small chance of one edge character, at lengths around limit, so that about
// half of them are valid and the rest fail by exactly one character or by length.
func nearValidCorpus(seed uint64, allowed string, limit int) []string {
	r := rand.New(rand.NewPCG(seed, 7386))
	var out []string
	for range 5000 {
		n := 1 + r.IntN(limit+3)
		if r.IntN(4) == 0 {
			n = limit - 1 + r.IntN(3) // limit-1, limit, limit+1
		}
		var b strings.Builder
		for range n {
			b.WriteByte(allowed[r.IntN(len(allowed))])
		}
		s := b.String()
		if r.IntN(2) == 0 {
			i := r.IntN(len(s))
			s = s[:i] + nameAlphabet[r.IntN(len(nameAlphabet))] + s[i+1:]
		}
		out = append(out, s)
	}
	return out
}

func TestValidatorsAgreeWithProtocolRegexps(t *testing.T) {
	const (
		lower = "abcdefghijklmnopqrstuvwxyz"
		upper = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
		digit = "0123456789"
	)
	validators := []struct {
		name     string
		validate func(string) error
		re       *regexp.Regexp
		allowed  string
		limit    int
	}{
		{"ValidateContext", kuma.ValidateContext, protocolContextRe, lower + digit + "_-", 32},
		{"ValidateEntityID", kuma.ValidateEntityID, protocolEntityIDRe, lower + upper + digit + "_:=@-", 128},
		{"ValidateEventType", kuma.ValidateEventType, protocolEventTypeRe, lower + upper + digit + "_.:-", 128},
	}
	common := nameCorpus()
	for i, v := range validators {
		t.Run(v.name, func(t *testing.T) {
			corpus := append(nearValidCorpus(uint64(i), v.allowed, v.limit), common...)
			var accepted, refused int
			for _, s := range corpus {
				want := v.re.MatchString(s)
				err := v.validate(s)
				if got := err == nil; got != want {
					t.Errorf("%s(%q): got valid=%v (%v), want valid=%v (regexp %s)", v.name, s, got, err, want, v.re)
				}
				if want {
					accepted++
				} else {
					refused++
				}
			}
			// Guard against a corpus that only exercises one side.
			if accepted < 500 || refused < 500 {
				t.Fatalf("corpus too one-sided: got %d accepted and %d refused, want at least 500 of each", accepted, refused)
			}
		})
	}
}

func checkAgainstRegexp(t *testing.T, name string, validate func(string) error, re *regexp.Regexp, s string) {
	t.Helper()
	want := re.MatchString(s)
	err := validate(s)
	if got := err == nil; got != want {
		t.Fatalf("%s(%q): got valid=%v (%v), want valid=%v (regexp %s)", name, s, got, err, want, re)
	}
}

func addNameSeeds(f *testing.F) {
	for _, s := range []string{
		"", "a", "user_0x9A4F", "UserCreated", "a.b", "a*", "a>", "a b", "_a", "-a",
		"x_:=@-", "zoë", "a\n", "\xff",
		strings.Repeat("a", 32), strings.Repeat("a", 33),
		strings.Repeat("a", 128), strings.Repeat("a", 129),
	} {
		f.Add(s)
	}
}

func FuzzValidateEntityID(f *testing.F) {
	addNameSeeds(f)
	f.Fuzz(func(t *testing.T, s string) {
		checkAgainstRegexp(t, "ValidateEntityID", kuma.ValidateEntityID, protocolEntityIDRe, s)
	})
}

func FuzzValidateEventType(f *testing.F) {
	addNameSeeds(f)
	f.Fuzz(func(t *testing.T, s string) {
		checkAgainstRegexp(t, "ValidateEventType", kuma.ValidateEventType, protocolEventTypeRe, s)
	})
}

func FuzzValidateContext(f *testing.F) {
	addNameSeeds(f)
	f.Fuzz(func(t *testing.T, s string) {
		checkAgainstRegexp(t, "ValidateContext", kuma.ValidateContext, protocolContextRe, s)
	})
}

func TestDefaultContextIsValid(t *testing.T) {
	if kuma.DefaultContext != "default" {
		t.Fatalf("got DefaultContext %q, want %q", kuma.DefaultContext, "default")
	}
	if err := kuma.ValidateContext(kuma.DefaultContext); err != nil {
		t.Fatalf("ValidateContext(DefaultContext): got %v, want nil", err)
	}
}
