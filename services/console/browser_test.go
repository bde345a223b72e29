//go:build browser

// The console driven in headless Chromium: `go test -tags browser
// ./services/console/` (.ci/run installs Debian's chromium when it can).
// Screenshots go to $KUMA_SCREENSHOTS, or to a temporary directory whose
// path the test logs.
package console_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
	"github.com/kumadb/kuma/internal/app"
	"github.com/kumadb/kuma/internal/kumatest"
	"github.com/kumadb/kuma/pkg/client"
	"github.com/kumadb/kuma/pkg/kuma"
)

// browser starts headless Chromium for the test.
func browser(t *testing.T) context.Context {
	t.Helper()
	var path string
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome", "headless-shell"} {
		if p, err := exec.LookPath(name); err == nil {
			path = p
			break
		}
	}
	if path == "" {
		t.Skip("browser tests need Chromium on the PATH (Debian: apt-get install -y chromium)")
	}
	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(path),
		chromedp.NoSandbox, // CI runs as root
		chromedp.Flag("disable-dev-shm-usage", true),
		chromedp.WindowSize(1360, 900),
	)
	actx, cancelAlloc := chromedp.NewExecAllocator(t.Context(), opts...)
	ctx, cancelCtx := chromedp.NewContext(actx)
	t.Cleanup(func() { cancelCtx(); cancelAlloc() })
	if err := chromedp.Do(ctx); err != nil { // starts the browser
		t.Fatalf("start %s: %v", path, err)
	}
	return ctx
}

// screenshots is where the PNGs go.
func screenshots(t *testing.T) string {
	dir := os.Getenv("KUMA_SCREENSHOTS")
	if dir == "" {
		dir = t.TempDir()
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Logf("screenshots in %s", dir)
	return dir
}

func shoot(t *testing.T, ctx context.Context, dir, name string, full bool) {
	t.Helper()
	var png []byte
	var err error
	if full {
		png, err = chromedp.Run(ctx, chromedp.FullScreenshot(100))
	} else {
		png, err = chromedp.Run(ctx, chromedp.CaptureScreenshot())
	}
	if err != nil {
		t.Fatalf("screenshot %s: %v", name, err)
	}
	if err := os.WriteFile(filepath.Join(dir, name), png, 0o644); err != nil {
		t.Fatal(err)
	}
}

// wait polls a JavaScript predicate in the page.
func wait(t *testing.T, ctx context.Context, what, predicate string) {
	t.Helper()
	if err := chromedp.Do(ctx, chromedp.Poll[chromedp.Void](predicate, chromedp.WithPollingTimeout(15*time.Second))); err != nil {
		page, _ := chromedp.Run(ctx, chromedp.Evaluate[string](`document.querySelector("main").innerText.slice(0, 600)`))
		t.Fatalf("waiting for %s: %v\npage shows:\n%s", what, err, page)
	}
}

func eval[T any](t *testing.T, ctx context.Context, expr string) T {
	t.Helper()
	v, err := chromedp.Run(ctx, chromedp.Evaluate[T](expr))
	if err != nil {
		t.Fatalf("%s: %v", expr, err)
	}
	return v
}

// versions of order_1 and the state after each (merge patch).
var orderEvents = []struct{ typ, data, state string }{
	{"OrderPlaced", `{"customer":"acme","items":2,"status":"placed","total":40}`, `{"customer":"acme","items":2,"status":"placed","total":40}`},
	{"ItemAdded", `{"items":3,"total":55.5}`, `{"customer":"acme","items":3,"status":"placed","total":55.5}`},
	{"OrderPaid", `{"status":"paid","paid_with":"card"}`, `{"customer":"acme","items":3,"paid_with":"card","status":"paid","total":55.5}`},
	{"OrderShipped", `{"status":"shipped","carrier":"posten","tracking":"PN123456789NO"}`, `{"carrier":"posten","customer":"acme","items":3,"paid_with":"card","status":"shipped","total":55.5,"tracking":"PN123456789NO"}`},
	{"OrderDelivered", `{"status":"delivered","tracking":null}`, `{"carrier":"posten","customer":"acme","items":3,"paid_with":"card","status":"delivered","total":55.5}`},
}

func TestBrowser(t *testing.T) {
	ctx := browser(t)
	dir := screenshots(t)
	n := kumatest.Start(t, nil)
	c := n.Client(client.Options{})
	for _, ev := range orderEvents {
		if _, err := c.Append(t.Context(), "order_1", []kuma.EventInput{{Type: ev.typ, Data: json.RawMessage(ev.data)}}); err != nil {
			t.Fatal(err)
		}
	}
	// As `kuma up` runs it on loopback: writes allowed.
	con := startConsole(t, n, true, time.Second)

	t.Run("monitor counts events while they are appended", func(t *testing.T) {
		if err := chromedp.Do(ctx, chromedp.Navigate(con.URL()+"#/monitor")); err != nil {
			t.Fatal(err)
		}
		wait(t, ctx, "the first sample", `/^[0-9,]+$/.test(document.getElementById("m-events-total").textContent)`)
		before := eventsShown(t, ctx)
		stop := appendLoad(t, c)
		defer stop()
		wait(t, ctx, "the counter to rise", fmt.Sprintf(`parseInt(document.getElementById("m-events-total").textContent.replace(/,/g, ""), 10) >= %d`, before+500))
		wait(t, ctx, "a rate above zero", `parseFloat(document.getElementById("m-eps").textContent.replace(/,/g, "")) > 0`)
		after := eventsShown(t, ctx)
		if after <= before {
			t.Fatalf("events shown went from %d to %d while appending", before, after)
		}
		time.Sleep(6 * time.Second) // some chart to look at
		shoot(t, ctx, dir, "console-monitor.png", true)
		stop()
	})

	t.Run("entity browser travels through versions", func(t *testing.T) {
		if err := chromedp.Do(ctx, chromedp.Navigate(con.URL()+"#/entity/order_1?v=1")); err != nil {
			t.Fatal(err)
		}
		checkState(t, ctx, 1)
		// The slider: the middle version, then the last.
		for _, v := range []int{3, len(orderEvents)} {
			eval[chromedp.Void](t, ctx, fmt.Sprintf(`(() => { const s = document.getElementById("slider"); s.value = %d; s.dispatchEvent(new Event("input")); })()`, v))
			checkState(t, ctx, v)
		}
		// The previous-version button and a click on the timeline agree.
		if err := chromedp.Do(ctx, chromedp.Click(chromedp.CSS("#v-prev"))); err != nil {
			t.Fatal(err)
		}
		checkState(t, ctx, len(orderEvents)-1)
		if err := chromedp.Do(ctx, chromedp.Click(chromedp.CSS(`#timeline .ev[data-v="3"] .ev-type`))); err != nil {
			t.Fatal(err)
		}
		checkState(t, ctx, 3)
		if got := eval[int](t, ctx, `document.querySelectorAll("#timeline .ev").length`); got != len(orderEvents) {
			t.Errorf("timeline shows %d events, want %d", got, len(orderEvents))
		}
		if got := eval[string](t, ctx, `document.querySelector("#timeline .ev.sel .ev-type").textContent`); got != orderEvents[2].typ {
			t.Errorf("timeline marks %q, want %q", got, orderEvents[2].typ)
		}
		shoot(t, ctx, dir, "console-entity.png", false)
	})

	t.Run("read-only console refuses forget", func(t *testing.T) {
		ro := startConsole(t, n, false, time.Second)
		if err := chromedp.Do(ctx, chromedp.Navigate(ro.URL()+"#/entity/order_1")); err != nil {
			t.Fatal(err)
		}
		checkState(t, ctx, len(orderEvents))
		confirmForget(t, ctx, "order_1")
		wait(t, ctx, "the refusal", `!document.getElementById("forget-error").hidden`)
		msg := eval[string](t, ctx, `document.getElementById("forget-error").textContent`)
		if !strings.Contains(msg, "forbidden") || !strings.Contains(msg, "read-only") {
			t.Errorf("the refusal reads %q; want forbidden and why", msg)
		}
		shoot(t, ctx, dir, "console-readonly.png", false)
		if _, err := c.Read(t.Context(), "order_1"); err != nil {
			t.Fatalf("a read-only console erased the entity: %v", err)
		}
	})

	t.Run("forget from the UI", func(t *testing.T) {
		if err := chromedp.Do(ctx, chromedp.Navigate(con.URL()+"#/entity/order_1")); err != nil {
			t.Fatal(err)
		}
		checkState(t, ctx, len(orderEvents))
		if err := chromedp.Do(ctx, chromedp.Click(chromedp.CSS("#forget-open"))); err != nil {
			t.Fatal(err)
		}
		if eval[bool](t, ctx, `!document.getElementById("forget-go").disabled`) {
			t.Fatal("forget is enabled before the id is typed")
		}
		if err := chromedp.Do(ctx, chromedp.SendKeys(chromedp.CSS("#forget-confirm"), "order_"),
			chromedp.SendKeys(chromedp.CSS("#forget-reason"), "customer asked, ticket 42")); err != nil {
			t.Fatal(err)
		}
		if eval[bool](t, ctx, `!document.getElementById("forget-go").disabled`) {
			t.Fatal("forget is enabled with half the id typed")
		}
		if err := chromedp.Do(ctx, chromedp.SendKeys(chromedp.CSS("#forget-confirm"), "1")); err != nil {
			t.Fatal(err)
		}
		wait(t, ctx, "forget to be enabled", `!document.getElementById("forget-go").disabled`)
		shoot(t, ctx, dir, "console-forget.png", false)
		if err := chromedp.Do(ctx, chromedp.Click(chromedp.CSS("#forget-go"))); err != nil {
			t.Fatal(err)
		}
		wait(t, ctx, "the entity to show as forgotten", `document.getElementById("entity-error").textContent.includes("entity_forgotten")`)
		if _, err := c.Read(t.Context(), "order_1"); !errors.Is(err, kuma.ErrEntityForgotten) {
			t.Fatalf("read after forget from the UI: %v, want entity_forgotten", err)
		}
		shoot(t, ctx, dir, "console-forgotten.png", false)
	})

	t.Run("projections page", func(t *testing.T) {
		if err := chromedp.Do(ctx, chromedp.Navigate(con.URL()+"#/projections")); err != nil {
			t.Fatal(err)
		}
		wait(t, ctx, "the entities projection", `!!document.querySelector('.proj[data-name="entities"]')`)
		if err := chromedp.Do(ctx, chromedp.Click(chromedp.CSS(`.proj[data-name="entities"] button[data-act="rebuild"]`))); err != nil {
			t.Fatal(err)
		}
		// A rebuild of a few thousand events may finish before the next
		// sample: its progress or the next generation shows it.
		wait(t, ctx, "the rebuild", `(() => {
			const card = document.querySelector('.proj[data-name="entities"]');
			return !card.querySelector('[data-f="rebuild"]').hidden || parseInt(card.querySelector('[data-f="gen"]').textContent, 10) > 1;
		})()`)
		wait(t, ctx, "the toast", `document.getElementById("toast").textContent.includes("Rebuild of entities started")`)
		shoot(t, ctx, dir, "console-projections.png", false)
	})
}

func eventsShown(t *testing.T, ctx context.Context) int {
	t.Helper()
	s := eval[string](t, ctx, `document.getElementById("m-events-total").textContent`)
	n, err := strconv.Atoi(strings.ReplaceAll(s, ",", ""))
	if err != nil {
		t.Fatalf("events shown %q: %v", s, err)
	}
	return n
}

// checkState waits until the state panel shows version v and compares it
// with the state the events make.
func checkState(t *testing.T, ctx context.Context, v int) {
	t.Helper()
	wait(t, ctx, fmt.Sprintf("the state at version %d", v), fmt.Sprintf(`document.getElementById("state-json").dataset.version === "%d"`, v))
	text := eval[string](t, ctx, `document.getElementById("state-json").textContent`)
	var got any
	if err := json.Unmarshal([]byte(text), &got); err != nil {
		t.Fatalf("state at version %d is not JSON: %v\n%s", v, err, text)
	}
	b, _ := json.Marshal(got)
	if want := orderEvents[v-1].state; string(b) != want {
		t.Errorf("state at version %d = %s, want %s", v, b, want)
	}
	if label := eval[string](t, ctx, `document.getElementById("state-version").textContent`); !strings.Contains(label, "version "+strconv.Itoa(v)) {
		t.Errorf("the version label reads %q at version %d", label, v)
	}
}

// confirmForget opens the forget dialog, types the id and presses forget.
func confirmForget(t *testing.T, ctx context.Context, id string) {
	t.Helper()
	if err := chromedp.Do(ctx, chromedp.Click(chromedp.CSS("#forget-open")),
		chromedp.SendKeys(chromedp.CSS("#forget-confirm"), id)); err != nil {
		t.Fatal(err)
	}
	wait(t, ctx, "forget to be enabled", `!document.getElementById("forget-go").disabled`)
	if err := chromedp.Do(ctx, chromedp.Click(chromedp.CSS("#forget-go"))); err != nil {
		t.Fatal(err)
	}
}

// appendLoad appends batches to many entities until stopped, at a rate
// that wanders so the chart has a shape.
func appendLoad(t *testing.T, c *client.Client) (stop func()) {
	ctx, cancel := context.WithCancel(t.Context())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 0; ctx.Err() == nil; i++ {
			batch := make([]kuma.EventInput, 10+(i/25)%4*10)
			for j := range batch {
				batch[j] = kuma.EventInput{Type: "Ticked", Data: json.RawMessage(fmt.Sprintf(`{"n":%d}`, j))}
			}
			if _, err := c.Append(ctx, fmt.Sprintf("sensor_%03d", i%200), batch); err != nil && ctx.Err() == nil {
				t.Errorf("append: %v", err)
				return
			}
			time.Sleep(10 * time.Millisecond)
		}
	}()
	var once sync.Once
	return func() { once.Do(func() { cancel(); wg.Wait() }) }
}

// TestBrowserBrowseAndLayout: the entity browser finds an entity by prefix
// through paging and shows the count of matches; times read as ISO in UTC;
// the shard map lays out 16, 64 and 256 shards with a full last row.
func TestBrowserBrowseAndLayout(t *testing.T) {
	ctx := browser(t)
	dir := screenshots(t)
	n := kumatest.Start(t, func(c *app.Config) { c.Shards = 16 })
	ids := seedUsers(t, n, 120)
	users := 0
	for _, id := range ids {
		if strings.HasPrefix(id, "user_") {
			users++
		}
	}
	con := startConsole(t, n, true, time.Second)

	t.Run("find an entity by prefix through paging", func(t *testing.T) {
		if err := chromedp.Do(ctx, chromedp.Navigate(con.URL()+"#/entity")); err != nil {
			t.Fatal(err)
		}
		wait(t, ctx, "the browser", `!document.getElementById("entity-empty").hidden`)
		// The projection applies the shards a moment apart: search until
		// every user is counted.
		want := fmt.Sprintf("%d entities · prefix user_", users)
		wait(t, ctx, "the count of users", fmt.Sprintf(`(() => {
			const c = document.getElementById("browse-count").textContent;
			if (c.startsWith(%q)) return true;
			document.getElementById("browse-prefix").value = "user_";
			document.getElementById("browse-go").click();
			return false;
		})()`, want))
		if got := eval[int](t, ctx, `document.querySelectorAll("#browse-table tbody tr").length`); got != 25 {
			t.Errorf("the first page shows %d rows, want 25", got)
		}
		if page := eval[string](t, ctx, `document.getElementById("browse-page").textContent`); page != fmt.Sprintf("page 1 of %d", (users+24)/25) {
			t.Errorf("pager reads %q", page)
		}
		found := false
		for page := 1; page <= 10 && !found; page++ {
			found = eval[bool](t, ctx, `!!document.querySelector('#browse-table a[href="#/entity/user_0x9A4F"]')`)
			if !found {
				before := eval[string](t, ctx, `document.getElementById("browse-page").textContent`)
				if err := chromedp.Do(ctx, chromedp.Click(chromedp.CSS("#browse-next"))); err != nil {
					t.Fatal(err)
				}
				wait(t, ctx, "the next page", fmt.Sprintf(`document.getElementById("browse-page").textContent !== %q`, before))
			}
		}
		if !found {
			t.Fatal("user_0x9A4F not found by paging through prefix user_")
		}
		shoot(t, ctx, dir, "console-browse.png", false)
		if err := chromedp.Do(ctx, chromedp.Click(chromedp.CSS(`#browse-table a[href="#/entity/user_0x9A4F"]`))); err != nil {
			t.Fatal(err)
		}
		wait(t, ctx, "the entity", `document.getElementById("entity-id").textContent === "user_0x9A4F"`)
		meta := eval[string](t, ctx, `document.getElementById("entity-meta").textContent`)
		if ok, _ := regexp.MatchString(`created \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z`, meta); !ok {
			t.Errorf("entity times read %q, want ISO 8601 in UTC", meta)
		}
	})

	t.Run("filter by a state field", func(t *testing.T) {
		if err := chromedp.Do(ctx, chromedp.Navigate(con.URL()+"#/entity")); err != nil {
			t.Fatal(err)
		}
		wait(t, ctx, "the browser", `!document.getElementById("entity-empty").hidden`)
		eval[chromedp.Void](t, ctx, `(() => {
			document.getElementById("browse-prefix").value = "";
			document.getElementById("browse-where").value = "role=architect";
			document.getElementById("browse-go").click();
		})()`)
		wait(t, ctx, "the filtered count", `document.getElementById("browse-count").textContent.includes("where role=architect")`)
		roles := eval[[]string](t, ctx, `[...document.querySelectorAll("#browse-table tbody .state-cell")].map((td) => JSON.parse(td.textContent).role)`)
		if len(roles) == 0 || slices.ContainsFunc(roles, func(r string) bool { return r != "architect" }) {
			t.Errorf("filtered rows have roles %v", roles)
		}
	})

	t.Run("the monitor's clock is ISO in UTC", func(t *testing.T) {
		if err := chromedp.Do(ctx, chromedp.Navigate(con.URL()+"#/monitor")); err != nil {
			t.Fatal(err)
		}
		wait(t, ctx, "a sample", `document.getElementById("m-updated").textContent.includes("updated")`)
		text := eval[string](t, ctx, `document.getElementById("m-updated").textContent`)
		if ok, _ := regexp.MatchString(`updated \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$`, text); !ok {
			t.Errorf("the monitor reads %q, want the time as 2026-12-06T11:39:53Z", text)
		}
	})

	for _, shards := range []int{16, 64, 256} {
		t.Run(fmt.Sprintf("shard map of %d shards", shards), func(t *testing.T) {
			node := n
			if shards != 16 {
				node = kumatest.Start(t, func(c *app.Config) { c.Shards = shards })
			}
			mc := startConsole(t, node, false, time.Second)
			if err := chromedp.Do(ctx, chromedp.Navigate(mc.URL()+"#/monitor")); err != nil {
				t.Fatal(err)
			}
			wait(t, ctx, "every shard's tile", fmt.Sprintf(`document.querySelectorAll("#m-shardmap .shard").length === %d`, shards))
			// Rows by the tiles' tops: every row as long as the first.
			rows := eval[[]int](t, ctx, `(() => {
				const tops = new Map();
				for (const el of document.querySelectorAll("#m-shardmap .shard")) tops.set(el.offsetTop, (tops.get(el.offsetTop) || 0) + 1);
				return [...tops.values()];
			})()`)
			for _, r := range rows {
				if r != rows[0] {
					t.Errorf("%d shards lay out in rows of %v: a short last row", shards, rows)
					break
				}
			}
			if len(rows) > 16 {
				t.Errorf("%d shards take %d rows", shards, len(rows))
			}
			t.Logf("%d shards: %d rows of %d", shards, len(rows), rows[0])
			shoot(t, ctx, dir, fmt.Sprintf("console-shards-%d.png", shards), true)
		})
	}
}
