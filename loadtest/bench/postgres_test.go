package bench

import (
	"bytes"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// startPostgres runs a throwaway PostgreSQL of Debian's package on a free
// loopback port with its data in a temp dir, stopped when the test ends,
// and returns its DSN. It skips, saying what to install, where the server
// is missing (.ci/run installs it).
func startPostgres(t *testing.T) string {
	t.Helper()
	bin := "/usr/lib/postgresql/15/bin"
	if _, err := os.Stat(filepath.Join(bin, "initdb")); err != nil {
		t.Skip("no PostgreSQL server here (apt-get install postgresql): the postgres baseline is not run")
	}
	dir := t.TempDir()
	// initdb refuses to run as root: run the server as the package's user.
	var as []string
	if os.Geteuid() == 0 {
		u, err := user.Lookup("postgres")
		if err != nil {
			t.Skip("running as root and there is no postgres user to run the server as")
		}
		as = []string{"runuser", "-u", u.Username, "--"}
		// t.TempDir's parents are root's 0700: give the server a dir of its own.
		pgDir, err := os.MkdirTemp("/tmp", "kuma-pg-")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(pgDir) })
		if out, err := exec.Command("chown", u.Username, pgDir).CombinedOutput(); err != nil {
			t.Fatalf("chown: %v %s", err, out)
		}
		dir = pgDir
	}
	data := filepath.Join(dir, "data")
	run := func(args ...string) {
		t.Helper()
		argv := append(append([]string(nil), as...), args...)
		cmd := exec.Command(argv[0], argv[1:]...)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("%v: %v\n%s", args, err, out)
		}
	}
	run(filepath.Join(bin, "initdb"), "-D", data, "-U", "kuma", "--auth=trust", "-E", "UTF8")
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	run(filepath.Join(bin, "pg_ctl"), "-D", data, "-w", "-t", "60", "-l", filepath.Join(dir, "log"),
		"-o", fmt.Sprintf("-p %d -k %s -c listen_addresses=127.0.0.1", port, dir), "start")
	t.Cleanup(func() { run(filepath.Join(bin, "pg_ctl"), "-D", data, "-m", "immediate", "stop") })
	return fmt.Sprintf("postgres://kuma@127.0.0.1:%d/postgres?sslmode=disable", port)
}

func TestPostgresBaselineStoresEveryRow(t *testing.T) {
	dsn := startPostgres(t)
	c := small()
	c.pgDSN, c.pgPool = dsn, 4
	pg, err := openPostgres(t.Context(), c)
	if err != nil {
		t.Fatal(err)
	}
	defer pg.close()
	now := time.Now()
	for i := 0; i < 10; i++ {
		if err := pg.commit(t.Context(), 0, fmt.Sprintf("e%d", i%3), []int64{int64(i/3*2 + 1), int64(i/3*2 + 2)}, []byte(`{"a":1}`), now); err != nil {
			t.Fatal(err)
		}
	}
	// The primary key holds: the same (entity, version) again is refused.
	if err := pg.commit(t.Context(), 0, "e0", []int64{1}, []byte(`{}`), now); err == nil {
		t.Fatal("a duplicate (entity, version) was stored")
	}
	if n, err := pg.count(t.Context()); err != nil || n != 20 {
		t.Fatalf("%d rows (%v), want 20", n, err)
	}

	// The whole baseline in a run, beside Kuma's.
	c.baseline = BaselinePostgres
	var out bytes.Buffer
	rep, err := runAll(t.Context(), c, &out)
	if err != nil {
		t.Fatalf("%v\n%s", err, out.String())
	}
	if len(rep.Baselines) != 1 || rep.Baselines[0].Events != int64(c.events) || rep.Baselines[0].Errors != 0 || rep.Baselines[0].Ratio <= 0 {
		t.Fatalf("baselines %+v", rep.Baselines)
	}
	if !strings.Contains(out.String(), "kuma / baseline postgres:") {
		t.Fatalf("no ratio printed:\n%s", out.String())
	}
	t.Log(out.String())
}

func TestPostgresBaselineNeedsADSN(t *testing.T) {
	var out, errb bytes.Buffer
	if code := Main(t.Context(), "kuma bench", []string{"--baseline", "sqlite,postgres", "--events", "100"}, Options{}, &out, &errb); code != 2 {
		t.Fatalf("exit %d, want 2", code)
	}
	if !strings.Contains(errb.String(), "--pg-dsn") || !strings.Contains(errb.String(), "initdb") || out.Len() != 0 {
		t.Fatalf("stderr %q, stdout %q: want the refusal and how to start a PostgreSQL, before any run", errb.String(), out.String())
	}
}
