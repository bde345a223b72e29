// Package natsbus is Kuma's glue to NATS: the embedded server, and the one
// place where protocol errors become NATS service error replies and back.
package natsbus
