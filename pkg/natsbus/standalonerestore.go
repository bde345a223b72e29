package natsbus

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
)

// RestoreExport carries out step 2: it restores every stream of the
// pending export under storeDir through nc (whose JetStream must answer),
// then removes the export, and returns the names restored. A stream the
// cluster already holds with the exported last sequence counts as
// restored (a crash came after it); one it holds with another state is
// refused: that cluster has streams of its own, which a standalone
// node's cannot be merged into.
func RestoreExport(ctx context.Context, nc *nats.Conn, storeDir string, log *slog.Logger) ([]string, error) {
	dir := filepath.Join(storeDir, exportDir)
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("nats: restore the standalone export: %w", err)
	}
	var names []string
	for _, e := range entries {
		if name, ok := strings.CutSuffix(e.Name(), ".json"); ok {
			names = append(names, name)
		}
	}
	slices.Sort(names)
	for _, name := range names {
		if err := restoreWithRetries(ctx, nc, dir, name, log); err != nil {
			return nil, err
		}
	}
	if err := os.RemoveAll(dir); err != nil {
		return nil, fmt.Errorf("nats: remove the restored export: %w", err)
	}
	return names, nil
}

// restoreAttempts bounds how often one stream's restore is started.
const restoreAttempts = 4

// restoreWithRetries restores one stream, starting over when an attempt
// fails on its way: an upload the server gives up (no chunk for 5 s) leaves
// no stream behind, so the next attempt, once that has happened, starts
// clean; and one that did land is recognised by restoreStream's check of
// the cluster's copy. A stream the cluster holds with another state is
// refused at once.
func restoreWithRetries(ctx context.Context, nc *nats.Conn, dir, name string, log *slog.Logger) error {
	var err error
	for attempt := 1; attempt <= restoreAttempts; attempt++ {
		if err = restoreStream(ctx, nc, dir, name, log); err == nil || errors.Is(err, errForeignStream) || ctx.Err() != nil {
			return err
		}
		log.Warn("a stream's restore failed; starting it again", "stream", name, "attempt", attempt, "err", err)
		// An attempt cut short leaves its upload open on the server until
		// it stalls (5 s without a chunk); until then the name is taken.
		select {
		case <-ctx.Done():
			return err
		case <-time.After(6 * time.Second):
		}
	}
	return err
}

// errForeignStream marks a cluster's stream that is not the export's.
var errForeignStream = errors.New("the cluster holds a stream of that name that is not this node's")

func restoreStream(ctx context.Context, nc *nats.Conn, dir, name string, log *slog.Logger) error {
	meta, err := os.ReadFile(filepath.Join(dir, name+".json"))
	if err != nil {
		return fmt.Errorf("nats: restore stream %s: %w", name, err)
	}
	var req server.JSApiStreamRestoreRequest
	if err := json.Unmarshal(meta, &req); err != nil {
		return fmt.Errorf("nats: restore stream %s: %s: %w", name, dir, err)
	}
	var info server.JSApiStreamInfoResponse
	err = retryJS(ctx, nc, fmt.Sprintf(server.JSApiStreamInfoT, name), nil, &info, &info.ApiResponse)
	switch {
	case err == nil && info.StreamInfo != nil:
		if got := info.State; got.LastSeq == req.State.LastSeq && got.Msgs == req.State.Msgs {
			log.Info("stream already restored", "stream", name)
			return nil
		}
		return fmt.Errorf("nats: the cluster already holds a stream %s (last sequence %d, %d messages) that is not this node's standalone one (last sequence %d, %d messages): a standalone node can only become the first member of a new cluster; its export is kept in %s: %w",
			name, info.State.LastSeq, info.State.Msgs, req.State.LastSeq, req.State.Msgs, dir, errForeignStream)
	case err != nil && !isAPIError(err, server.JSStreamNotFoundErr):
		return fmt.Errorf("nats: restore stream %s: %w", name, err)
	}
	f, err := os.Open(filepath.Join(dir, name+".snap"))
	if err != nil {
		return fmt.Errorf("nats: restore stream %s: %w", name, err)
	}
	defer f.Close()
	var start server.JSApiStreamRestoreResponse
	// No responders means no server took the request (JetStream's API not
	// answering for a moment, as while the meta layer takes a blocking
	// snapshot just after the cluster formed): nothing started, so unlike
	// a timeout it is safe to send again.
	for {
		err = jsRequest(ctx, nc, fmt.Sprintf(server.JSApiStreamRestoreT, name), meta, &start, &start.ApiResponse)
		if !IsNoResponders(err) {
			break
		}
		log.Info("JetStream did not take the restore yet; trying again", "stream", name)
		select {
		case <-ctx.Done():
			return fmt.Errorf("nats: restore stream %s: %w", name, err)
		case <-time.After(250 * time.Millisecond):
		}
	}
	if err != nil {
		return fmt.Errorf("nats: restore stream %s: %w", name, err)
	}
	buf := make([]byte, exportChunk)
	for {
		n, rerr := io.ReadFull(f, buf)
		if n > 0 {
			var ack server.JSApiStreamCreateResponse
			if err := chunkRequest(ctx, nc, start.DeliverSubject, buf[:n], &ack); err != nil {
				return fmt.Errorf("nats: restore stream %s: %w", name, err)
			}
		}
		if errors.Is(rerr, io.EOF) || errors.Is(rerr, io.ErrUnexpectedEOF) {
			break
		}
		if rerr != nil {
			return fmt.Errorf("nats: restore stream %s: %w", name, rerr)
		}
	}
	// An empty chunk ends the upload; its answer is the restored stream.
	var done server.JSApiStreamCreateResponse
	if err := chunkRequest(ctx, nc, start.DeliverSubject, nil, &done); err != nil {
		return fmt.Errorf("nats: restore stream %s: %w", name, err)
	}
	if done.StreamInfo == nil || done.State.LastSeq != req.State.LastSeq {
		return fmt.Errorf("nats: restore stream %s: restored up to sequence %d, exported up to %d", name, lastSeq(done.StreamInfo), req.State.LastSeq)
	}
	log.Info("restored a stream of the standalone store into the cluster", "stream", name, "messages", done.State.Msgs, "last_seq", done.State.LastSeq)
	return nil
}

func lastSeq(si *server.StreamInfo) uint64 {
	if si == nil {
		return 0
	}
	return si.State.LastSeq
}

// chunkRequest sends one restore chunk and reads its ack: empty while the
// upload goes on, an API response (an error, or the stream at the end).
//
// The upload's subject is subscribed on the server that restores the
// stream, which may be another member: just after the cluster formed, this
// server may not know that interest yet, and the chunk then finds no
// responders. Nobody took it, so it goes again (for up to 3 s: the server
// gives an upload up after 5 s without a chunk).
func chunkRequest(ctx context.Context, nc *nats.Conn, subject string, data []byte, resp *server.JSApiStreamCreateResponse) error {
	rctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	var msg *nats.Msg
	var err error
	for resend := time.Now().Add(3 * time.Second); ; {
		msg, err = nc.RequestWithContext(rctx, subject, data)
		if !IsNoResponders(err) || time.Now().After(resend) {
			break
		}
		select {
		case <-rctx.Done():
			return err
		case <-time.After(50 * time.Millisecond):
		}
	}
	if err != nil {
		return err
	}
	if len(msg.Data) == 0 {
		return nil
	}
	if err := json.Unmarshal(msg.Data, resp); err != nil {
		return fmt.Errorf("bad answer %q: %w", msg.Data, err)
	}
	if resp.Error != nil {
		return resp.Error
	}
	return nil
}
