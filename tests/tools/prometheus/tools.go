//go:build tools

// Package tools pins Prometheus: promtool for rule tests and metric lint, and the
// server that scrapes a real sidecar.
package tools

import (
	_ "github.com/prometheus/prometheus/cmd/prometheus"
	_ "github.com/prometheus/prometheus/cmd/promtool"
)
