package natsbus

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
)

// A standalone node becomes the first member of a cluster in two steps,
// because nats-server cannot adopt a standalone JetStream store (see
// ServerConfig): its streams have no meta group assignment, and a clustered
// server deletes them as orphans.
//
//  1. Export, before the clustered server starts (StartServer): a temporary
//     standalone server, listening nowhere, opens the old store; every
//     stream of it, its consumers included, is snapshotted through the
//     JetStream API ($JS.API.STREAM.SNAPSHOT, what `nats stream backup`
//     uses) into <store>/standalone-export; only then is the old store
//     moved aside to <store>/jetstream.standalone, kept as a backup.
//  2. Restore, once the cluster's JetStream answers (RestoreExport): each
//     snapshot is restored ($JS.API.STREAM.RESTORE, `nats stream restore`)
//     with its sequences, message ids, KV revisions and consumer positions,
//     so the event stream, the leases with their epochs, the snapshots and
//     the projector's consumer are what they were. The export is removed
//     when every stream is back.
//
// Each step is safe to run again after a crash: the export is written to a
// temporary directory and renamed when whole, and a stream the cluster
// already holds with the exported state is not restored twice.
const (
	exportDir     = "standalone-export"
	exportTmpDir  = "standalone-export.tmp"
	movedStoreDir = "jetstream.standalone"
	// exportChunk is the size of a restore chunk: each is one request and
	// its ack, so larger chunks mean fewer round trips, well under the
	// default 8 MiB max payload (and nats-server's 1 MiB default).
	exportChunk = 512 << 10
)

// convertingSubject is where a node carrying its standalone data into a
// cluster answers `unavailable` until its streams are restored, so that a
// member joining meanwhile waits (WaitConversions) instead of creating
// Kuma's streams empty and taking the shards with nothing in them.
const convertingSubject = kuma.InternalPrefix + ".cluster.converting"

// PendingExport reports whether storeDir holds an exported standalone
// store whose streams are not restored yet.
func PendingExport(storeDir string) bool {
	if storeDir == "" {
		return false
	}
	_, err := os.Stat(filepath.Join(storeDir, exportDir))
	return err == nil
}

// exportStandalone carries out step 1 for cfg.StoreDir, which holds a
// standalone store (standaloneStreams). It is called only for a server
// that is to be the first member of a new cluster: a standalone store's
// streams cannot be merged into a cluster that has its own.
func exportStandalone(ctx context.Context, cfg ServerConfig) error {
	log := cfg.Logger
	final := filepath.Join(cfg.StoreDir, exportDir)
	if _, err := os.Stat(final); err != nil {
		tmp := filepath.Join(cfg.StoreDir, exportTmpDir)
		if err := os.RemoveAll(tmp); err != nil { // a crash's half export
			return fmt.Errorf("nats: standalone export: %w", err)
		}
		if err := os.MkdirAll(tmp, 0o700); err != nil {
			return fmt.Errorf("nats: standalone export: %w", err)
		}
		names, err := exportStreams(ctx, cfg, tmp)
		if err != nil {
			return err
		}
		if err := syncDir(tmp); err != nil {
			return err
		}
		if err := os.Rename(tmp, final); err != nil {
			return fmt.Errorf("nats: standalone export: %w", err)
		}
		log.Info("exported the standalone JetStream store to carry it into the cluster", "streams", names, "dir", final)
	}
	// The export is whole: move the old store out of the clustered
	// server's way, keeping it as a backup that a standalone run can be
	// given back (rename it to jetstream).
	moved := filepath.Join(cfg.StoreDir, movedStoreDir)
	if _, err := os.Stat(moved); err == nil {
		moved += "." + time.Now().UTC().Format("20060102T150405Z")
	}
	if err := os.Rename(filepath.Join(cfg.StoreDir, server.JetStreamStoreDir), moved); err != nil {
		return fmt.Errorf("nats: standalone export: move the old store aside: %w", err)
	}
	if err := syncDir(cfg.StoreDir); err != nil {
		return err
	}
	log.Info("moved the standalone JetStream store aside; its streams are restored once the cluster's JetStream answers", "backup", moved)
	return nil
}

// exportStreams snapshots every stream of the standalone store into dir,
// through a temporary server that listens nowhere: <stream>.json holds the
// stream's config and state, <stream>.snap the snapshot.
func exportStreams(ctx context.Context, cfg ServerConfig, dir string) ([]string, error) {
	srv, err := server.NewServer(&server.Options{
		ServerName: "kuma-standalone-export",
		JetStream:  true,
		StoreDir:   cfg.StoreDir,
		DontListen: true,
		NoSigs:     true,
		NoLog:      true,
		MaxPayload: cfg.MaxPayload,
	})
	if err != nil {
		return nil, fmt.Errorf("nats: standalone export: %w", err)
	}
	go srv.Start()
	defer func() {
		srv.Shutdown()
		srv.WaitForShutdown()
	}()
	if !srv.ReadyForConnections(cfg.ReadyTimeout) {
		return nil, fmt.Errorf("nats: standalone export: the old store's server not ready after %s", cfg.ReadyTimeout)
	}
	nc, err := nats.Connect("", nats.InProcessServer(srv))
	if err != nil {
		return nil, fmt.Errorf("nats: standalone export: %w", err)
	}
	defer nc.Close()
	names, err := streamNames(ctx, nc)
	if err != nil {
		return nil, err
	}
	for _, name := range names {
		if err := exportStream(ctx, nc, name, dir); err != nil {
			return nil, err
		}
	}
	return names, nil
}

// streamNames lists the streams of nc's account.
func streamNames(ctx context.Context, nc *nats.Conn) ([]string, error) {
	var names []string
	for offset := 0; ; {
		body, _ := json.Marshal(server.JSApiStreamNamesRequest{ApiPagedRequest: server.ApiPagedRequest{Offset: offset}})
		var resp server.JSApiStreamNamesResponse
		if err := retryJS(ctx, nc, server.JSApiStreams, body, &resp, &resp.ApiResponse); err != nil {
			return nil, fmt.Errorf("nats: standalone export: list streams: %w", err)
		}
		names = append(names, resp.Streams...)
		offset += len(resp.Streams)
		if len(resp.Streams) == 0 || offset >= resp.Total {
			return names, nil
		}
	}
}

// exportStream snapshots one stream, consumers included, into dir.
func exportStream(ctx context.Context, nc *nats.Conn, name, dir string) error {
	f, err := os.OpenFile(filepath.Join(dir, name+".snap"), os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return fmt.Errorf("nats: standalone export: %w", err)
	}
	defer f.Close()
	inbox := nc.NewInbox()
	sub, err := nc.SubscribeSync(inbox)
	if err != nil {
		return fmt.Errorf("nats: standalone export: %w", err)
	}
	defer func() { _ = sub.Unsubscribe() }()
	body, _ := json.Marshal(server.JSApiStreamSnapshotRequest{DeliverSubject: inbox})
	var resp server.JSApiStreamSnapshotResponse
	if err := jsRequest(ctx, nc, fmt.Sprintf(server.JSApiStreamSnapshotT, name), body, &resp, &resp.ApiResponse); err != nil {
		return fmt.Errorf("nats: standalone export: snapshot stream %s: %w", name, err)
	}
	w := bufio.NewWriter(f)
	for {
		// The server sends a chunk at least every few seconds, or ends
		// with an error status; a silence this long is a stuck export.
		mctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		msg, err := sub.NextMsgWithContext(mctx)
		cancel()
		if err != nil {
			return fmt.Errorf("nats: standalone export: snapshot stream %s: %w", name, err)
		}
		if len(msg.Data) == 0 {
			// The end: no status (a snapshot of one chunk) or 204 is a
			// whole snapshot, anything else the server's failure.
			if st := msg.Header.Get("Status"); st != "" && st != "204" {
				return fmt.Errorf("nats: standalone export: snapshot stream %s: %s %s", name, st, msg.Header.Get("Description"))
			}
			break
		}
		if _, err := w.Write(msg.Data); err != nil {
			return fmt.Errorf("nats: standalone export: %w", err)
		}
		if msg.Reply != "" { // the server sends the next chunks once acked
			if err := msg.Respond(nil); err != nil {
				return fmt.Errorf("nats: standalone export: %w", err)
			}
		}
	}
	if err := w.Flush(); err != nil {
		return fmt.Errorf("nats: standalone export: %w", err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("nats: standalone export: %w", err)
	}
	meta, _ := json.Marshal(server.JSApiStreamRestoreRequest{Config: *resp.Config, State: *resp.State})
	if err := writeFileSync(filepath.Join(dir, name+".json"), meta); err != nil {
		return fmt.Errorf("nats: standalone export: %w", err)
	}
	return nil
}

// jsRequest sends one JetStream API request and decodes its answer into
// resp, whose ApiResponse is api; an API error is returned as a
// *server.ApiError. It is not retried: a snapshot or restore started twice
// would interleave two uploads (see retryJS for the idempotent ones).
func jsRequest(ctx context.Context, nc *nats.Conn, subject string, body []byte, resp any, api *server.ApiResponse) error {
	rctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	api.Error = nil
	msg, err := nc.RequestWithContext(rctx, subject, body)
	if err != nil {
		return err
	}
	if err := json.Unmarshal(msg.Data, resp); err != nil {
		return fmt.Errorf("bad answer to %s: %w", subject, err)
	}
	if api.Error != nil {
		return api.Error
	}
	return nil
}

// retryJS is jsRequest tried again while JetStream is not ready (a meta
// leader being elected), for requests that change nothing.
func retryJS(ctx context.Context, nc *nats.Conn, subject string, body []byte, resp any, api *server.ApiResponse) error {
	return RetryJetStream(ctx, slog.New(slog.DiscardHandler), func(ctx context.Context) error {
		return jsRequest(ctx, nc, subject, body, resp, api)
	})
}

func isAPIError(err error, code server.ErrorIdentifier) bool {
	var apiErr *server.ApiError
	return errors.As(err, &apiErr) && server.IsNatsErr(apiErr, code)
}

func writeFileSync(path string, data []byte) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// syncDir makes a rename in dir durable.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("nats: %w", err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("nats: sync %s: %w", dir, err)
	}
	return nil
}

// ServeConversion answers on the converting subject, for node, until the
// returned stop is called: every member joining meanwhile waits for it
// (WaitConversions). Subscribe before waiting for the cluster's JetStream,
// so that a joining member's route carries the interest before that member
// can create a stream.
func ServeConversion(nc *nats.Conn, node string) (stop func(), err error) {
	sub, err := nc.Subscribe(convertingSubject, func(m *nats.Msg) {
		_ = RespondError(nc, m, kuma.Errorf(kuma.CodeUnavailable, "node %s is carrying its standalone data into the cluster", node))
	})
	if err != nil {
		return nil, fmt.Errorf("nats: %w", err)
	}
	return func() { _ = sub.Unsubscribe() }, nil
}

// WaitConversions waits while a member of the cluster carries its
// standalone data into it (ServeConversion), so that this node creates no
// stream of Kuma's that the other is about to restore; it returns at once
// when none does, and with ctx's error when ctx ends first.
func WaitConversions(ctx context.Context, nc *nats.Conn, log *slog.Logger) error {
	logged := false
	for {
		rctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		msg, err := nc.RequestWithContext(rctx, convertingSubject, nil)
		cancel()
		switch {
		case IsNoResponders(err):
			return nil
		case err == nil:
			if !logged {
				log.Info("waiting for a member to carry its standalone data into the cluster", "reason", ReplyError(msg))
				logged = true
			}
		case ctx.Err() != nil:
			return fmt.Errorf("nats: waiting for a member's standalone data: %w", ctx.Err())
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("nats: waiting for a member's standalone data: %w", ctx.Err())
		case <-time.After(500 * time.Millisecond):
		}
	}
}
