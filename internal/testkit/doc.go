// Package testkit holds the test helpers that import no Kuma service: a
// bare embedded NATS server, a shared log buffer, a counter's value. A service's own
// in-package tests use it where kumatest, which starts whole apps and so
// imports every service, would be an import cycle.
package testkit
