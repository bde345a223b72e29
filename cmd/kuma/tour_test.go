package main

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestReadmeTour runs the README's tour as it is written: every `$` line of
// the code blocks marked <!-- tour -->, in order, in one bash, against a
// fresh `kuma up` with the default flags, and checks each command's output
// (stdout and stderr, as a terminal shows them) against the lines the
// README shows under it. `go run ./cmd/kuma` is this test binary acting as
// main, and `go tool nats` the module's nats tool, built once. So the README
// cannot drift from what Kuma does: a changed output, a refused command or a
// step that no longer makes sense fails here.
func TestReadmeTour(t *testing.T) {
	bash, err := exec.LookPath("bash")
	if err != nil {
		t.Skip("no bash to run the tour with")
	}
	readme, err := os.ReadFile(filepath.Join("..", "..", "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	steps, err := parseTour(string(readme))
	if err != nil {
		t.Fatalf("README.md: %v", err)
	}
	if len(steps) < 10 {
		t.Fatalf("README.md has %d tour steps; the <!-- tour --> markers are lost", len(steps))
	}
	natsTool := goToolPath(t, "nats")

	port := freePort(t)
	dir := t.TempDir()
	p := spawn(t, []string{"up", "--data", filepath.Join(dir, "data"), "--nats-listen", "127.0.0.1:" + strconv.Itoa(port),
		"--metrics-listen", "127.0.0.1:0", "--console-listen", "127.0.0.1:0"})
	p.waitReady(t, 60*time.Second)

	work := t.TempDir()
	script := tourScript(steps, work)
	cmd := exec.Command(bash, "--noprofile", "--norc", "-c", script)
	cmd.Dir = work
	url := "nats://127.0.0.1:" + strconv.Itoa(port)
	cmd.Env = append(os.Environ(), "KUMA_TEST_AS_MAIN=1", "KUMA_NATS_URL="+url, "NATS_URL="+url,
		"NATS_CONTEXT=", "TOUR_KUMA="+os.Args[0], "TOUR_NATS="+natsTool)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("the tour script: %v\n%s", err, out)
	}
	for i, s := range steps {
		out, _ := os.ReadFile(filepath.Join(work, fmt.Sprintf(".tour.out.%d", i)))
		rc, _ := os.ReadFile(filepath.Join(work, fmt.Sprintf(".tour.rc.%d", i)))
		got := strings.Split(strings.TrimRight(string(out), "\n "), "\n")
		if len(out) == 0 {
			got = nil
		}
		if code := strings.TrimSpace(string(rc)); code != strconv.Itoa(s.exit) {
			t.Fatalf("README.md:%d: %s\nexit %s, the README says %d; it printed:\n%s", s.line, s.cmd, code, s.exit, out)
		}
		if !matchLines(s.want, got) {
			t.Fatalf("README.md:%d: %s\nprinted:\n%s\nthe README shows:\n%s", s.line, s.cmd, out, strings.Join(s.want, "\n"))
		}
	}
}

// tourStep is one command of the tour and what the README shows it print.
type tourStep struct {
	line int // of the command in README.md
	cmd  string
	want []string
	exit int
}

var exitLine = regexp.MustCompile(`^\[exit (\d+)\]$`)

// parseTour reads the tour's steps from the README: in each block after a
// <!-- tour --> line, a line starting with "$ " is a command (continued by
// lines while it ends in a backslash), the lines up to the next command are
// its output, and a last line "[exit N]" its exit code (0 if absent).
func parseTour(readme string) ([]tourStep, error) {
	var steps []tourStep
	lines := strings.Split(readme, "\n")
	for i := 0; i < len(lines); i++ {
		if strings.TrimSpace(lines[i]) != "<!-- tour -->" {
			continue
		}
		if i+1 >= len(lines) || !strings.HasPrefix(lines[i+1], "```") {
			return nil, fmt.Errorf("line %d: <!-- tour --> is not followed by a code block", i+1)
		}
		i += 2
		var cur *tourStep
		for ; i < len(lines) && !strings.HasPrefix(lines[i], "```"); i++ {
			l := lines[i]
			switch {
			case strings.HasPrefix(l, "$ "):
				steps = append(steps, tourStep{line: i + 1, cmd: strings.TrimPrefix(l, "$ ")})
				cur = &steps[len(steps)-1]
				for strings.HasSuffix(l, `\`) && i+1 < len(lines) {
					i++
					l = lines[i]
					cur.cmd += "\n" + l
				}
			case cur == nil:
				return nil, fmt.Errorf("line %d: output before the block's first command", i+1)
			case exitLine.MatchString(l):
				cur.exit, _ = strconv.Atoi(exitLine.FindStringSubmatch(l)[1])
			case l == "" && (i+1 >= len(lines) || strings.HasPrefix(lines[i+1], "$ ") || strings.HasPrefix(lines[i+1], "```")):
				// a blank line between steps
			default:
				cur.want = append(cur.want, l)
			}
		}
		if i == len(lines) {
			return nil, fmt.Errorf("a tour block is not closed")
		}
	}
	return steps, nil
}

// tourScript is the steps as one bash script: each step's output and exit
// code go to files in dir, and `go run ./cmd/kuma` and `go tool nats` are
// the binaries the test named. The steps run in one shell, so a variable
// one sets is there for the next.
func tourScript(steps []tourStep, dir string) string {
	var b strings.Builder
	b.WriteString(`go() {
  if [ "$1" = run ] && [ "$2" = ./cmd/kuma ]; then shift 2; "$TOUR_KUMA" "$@"
  elif [ "$1" = tool ] && [ "$2" = nats ]; then shift 2; "$TOUR_NATS" "$@"
  else echo "the tour runs only go run ./cmd/kuma and go tool nats, not go $*" >&2; return 127; fi
}
`)
	for i, s := range steps {
		out := filepath.Join(dir, fmt.Sprintf(".tour.out.%d", i))
		rc := filepath.Join(dir, fmt.Sprintf(".tour.rc.%d", i))
		// The newline before } ends a comment on the command's line.
		fmt.Fprintf(&b, "{ %s\n} >%q 2>&1 </dev/null\necho $? >%q\n", s.cmd, out, rc)
	}
	return b.String()
}

// matchLines reports whether got is what want shows: line by line, where
// "..." inside a line stands for any text and a line that is only "..."
// for any number of lines (none too). Trailing blanks are not compared.
func matchLines(want, got []string) bool {
	if len(want) == 0 {
		return len(got) == 0
	}
	if strings.TrimSpace(want[0]) == "..." {
		for k := 0; k <= len(got); k++ {
			if matchLines(want[1:], got[k:]) {
				return true
			}
		}
		return false
	}
	return len(got) > 0 && lineMatches(want[0], got[0]) && matchLines(want[1:], got[1:])
}

func lineMatches(want, got string) bool {
	parts := strings.Split(want, "...")
	for i, p := range parts {
		parts[i] = regexp.QuoteMeta(p)
	}
	return regexp.MustCompile(`^` + strings.Join(parts, `.*`) + `$`).MatchString(strings.TrimRight(got, " \t"))
}

// goToolPath builds a tool of this module once (go tool -n) and returns its
// binary, so the tour does not pay go's start-up for every command.
func goToolPath(t *testing.T, name string) string {
	t.Helper()
	var out, errb bytes.Buffer
	cmd := exec.Command("go", "tool", "-n", name)
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		t.Fatalf("go tool -n %s: %v\n%s", name, err, errb.String())
	}
	return strings.TrimSpace(out.String())
}

func TestTourMatching(t *testing.T) {
	steps, err := parseTour("x\n<!-- tour -->\n```console\n$ a \\\n  b\none\n...\n[exit 1]\n\n$ c\n```\n")
	if err != nil || len(steps) != 2 || steps[0].cmd != "a \\\n  b" || steps[0].exit != 1 || len(steps[0].want) != 2 || steps[1].want != nil {
		t.Fatalf("parsed %+v, %v", steps, err)
	}
	if _, err := parseTour("<!-- tour -->\n```\n$ a\n"); err == nil {
		t.Fatal("an unclosed block parsed")
	}
	for _, tc := range []struct {
		want, got []string
		ok        bool
	}{
		{nil, nil, true},
		{nil, []string{"x"}, false},
		{[]string{"..."}, nil, true},
		{[]string{"a ... c"}, []string{"a b c"}, true},
		{[]string{"a ... c"}, []string{"a b d"}, false},
		{[]string{"a", "...", "z"}, []string{"a", "b", "c", "z"}, true},
		{[]string{"a", "...", "z"}, []string{"a", "b", "c"}, false},
		{[]string{"a", "z"}, []string{"a", "b", "z"}, false},
		{[]string{"{\"x\":1}"}, []string{"{\"x\":12}"}, false},
	} {
		if matchLines(tc.want, tc.got) != tc.ok {
			t.Errorf("matchLines(%q, %q) = %v", tc.want, tc.got, !tc.ok)
		}
	}
}
