// Package kuma holds Kuma's vocabulary: entity ids, events, versions, positions,
// the wire types of PROTOCOL.md, error codes and reducers.
//
// It imports nothing but the standard library; every other package depends on it
// and never the reverse, so a client in any program can share the exact rules
// the server enforces.
package kuma
