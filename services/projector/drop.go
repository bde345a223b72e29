package projector

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"

	"github.com/kumadb/kuma/pkg/kuma"
	"github.com/kumadb/kuma/pkg/projection"
	"github.com/nats-io/nats.go/jetstream"
)

// A projection removed from the declarations is not opened at the next
// start, but what it built stays: its read model files (event data in the
// clear) in every replica's folder, its row in the catalog and its durable
// consumers on the stream. Nothing removes them by itself, because a
// declarations file edited by mistake must not cost a rebuild of hours:
// the start names them (orphans), and a drop, which only an operator asks
// for, removes them on every replica.

// orphans lists the projections this replica's catalog knows that are not
// declared: removed from the declarations, their copies left behind.
func (s *Service) orphans(ctx context.Context) ([]string, error) {
	names, err := s.catalog.names(ctx)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, n := range names {
		if _, declared := s.specs[n]; !declared && n != EntitiesProjection {
			out = append(out, n)
		}
	}
	return out, nil
}

// noteOrphans logs, at start, every projection left behind by a removed
// declaration, with the command that removes it.
func (s *Service) noteOrphans(ctx context.Context) {
	orphans, err := s.orphans(ctx)
	if err != nil {
		s.log.Warn("could not list the projections left behind", "err", err)
		return
	}
	for _, n := range orphans {
		s.log.Warn("projection no longer declared: its read model files and durable consumers remain; kuma projection drop removes them",
			"projection", n, "context", s.cfg.Context, "command", "kuma projection drop "+n)
	}
}

// checkDroppable refuses a drop of what must not be dropped: the built-in
// projection, a declared one (it would be built again at the next start)
// and a name that could not be a projection's (it names files).
func (s *Service) checkDroppable(name string) error {
	switch {
	case name == EntitiesProjection:
		return kuma.Errorf(kuma.CodeBadRequest, "entities is the built-in projection; it cannot be dropped (rebuild it instead)")
	case !projection.ValidName(name):
		return kuma.Errorf(kuma.CodeBadRequest, "%q is not a projection name (1 to 63 lowercase letters, digits or _, starting with a letter)", name)
	}
	if _, declared := s.specs[name]; declared {
		return kuma.Errorf(kuma.CodeBadRequest, "projection %q is declared on node %s; remove it from the declarations and restart the projector before dropping it",
			name, s.cfg.NodeName)
	}
	return nil
}

// Drop removes, on this replica, everything a projection that is no longer
// declared left behind: its durable consumers, its read model files (every
// generation) and its catalog row. It answers not_found when there was
// nothing here, and what it removed otherwise.
func (s *Service) Drop(ctx context.Context, name string) ([]string, error) {
	if err := s.checkDroppable(name); err != nil {
		return nil, err
	}
	var removed []string
	// Consumers first: a file removed while its consumer stays would be
	// rebuilt from nothing by nobody, but a consumer left is what status
	// counts as a replica.
	consumers, err := s.dropConsumers(ctx, name)
	removed = append(removed, consumers...)
	if err != nil {
		return removed, kuma.Errorf(kuma.CodeUnavailable, "projection %q: its durable consumers could not all be deleted (%v); retry the drop", name, err)
	}
	files, err := s.dropFiles(name)
	removed = append(removed, files...)
	if err != nil {
		return removed, kuma.Errorf(kuma.CodeInternal, "projection %q: its read model files could not all be removed: %v", name, err)
	}
	known, err := s.catalog.remove(ctx, name)
	if err != nil {
		return removed, kuma.Errorf(kuma.CodeInternal, "projection %q: the catalog could not forget it: %v", name, err)
	}
	if known {
		removed = append(removed, "catalog entry")
	}
	if len(removed) == 0 {
		return nil, kuma.Errorf(kuma.CodeNotFound, "no projection %q left behind on node %s in context %q", name, s.cfg.NodeName, s.cfg.Context)
	}
	s.log.Info("projection dropped", "projection", name, "removed", strings.Join(removed, ", "))
	return removed, nil
}

// dropConsumers deletes this replica's durable consumers of the projection
// (found by their metadata, not their names, which node and context names
// may make ambiguous).
func (s *Service) dropConsumers(ctx context.Context, name string) ([]string, error) {
	st, err := s.stream(ctx)
	if err != nil {
		return nil, err
	}
	var mine []string
	list := st.ListConsumers(ctx)
	for ci := range list.Info() {
		md := ci.Config.Metadata
		if md[consumerMetaNode] == s.cfg.NodeName && md[consumerMetaProjection] == name {
			mine = append(mine, ci.Name)
		}
	}
	if err := list.Err(); err != nil {
		return nil, err
	}
	sort.Strings(mine)
	var removed []string
	for _, c := range mine {
		if err := st.DeleteConsumer(ctx, c); err != nil && !errors.Is(err, jetstream.ErrConsumerNotFound) {
			return removed, err
		}
		removed = append(removed, "consumer "+c)
	}
	return removed, nil
}

// dropFiles removes every generation's read model file of the projection
// (NAME.<generation>.db with its -wal and -shm).
func (s *Service) dropFiles(name string) ([]string, error) {
	matches, err := filepath.Glob(filepath.Join(s.dir, name+".*.db"))
	if err != nil {
		return nil, err
	}
	sort.Strings(matches)
	var removed []string
	for _, m := range matches {
		gen := strings.TrimSuffix(strings.TrimPrefix(filepath.Base(m), name+"."), ".db")
		if _, err := strconv.ParseUint(gen, 10, 63); err != nil {
			continue // another projection's, whose name only starts the same
		}
		if err := removeFiles(m); err != nil {
			return removed, err
		}
		removed = append(removed, "file "+filepath.Base(m))
	}
	return removed, nil
}

// DropAll drops a projection no longer declared on every replica.
func (s *Service) DropAll(ctx context.Context, name string) (*kuma.ProjectionActReply, error) {
	if err := s.checkDroppable(name); err != nil {
		return nil, err
	}
	r, err := s.adminAll(ctx, "drop", replicaRequest{Projection: name})
	if err != nil {
		return nil, err
	}
	return &kuma.ProjectionActReply{Projection: name, Dropped: true, ReplicaFanout: r.Fanout}, nil
}

// dropResult decodes what a replica's drop removed, for its ReplicaResult.
func dropResult(raw json.RawMessage) []string {
	var removed []string
	if err := json.Unmarshal(raw, &removed); err != nil {
		return []string{fmt.Sprintf("(unreadable answer: %v)", err)}
	}
	return removed
}

// removeFiles removes a SQLite file with its -wal and -shm.
func removeFiles(path string) error {
	var errs []error
	for _, suffix := range []string{"", "-wal", "-shm"} {
		if err := os.Remove(path + suffix); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}
