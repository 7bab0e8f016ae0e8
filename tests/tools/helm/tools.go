//go:build tools

// Package tools pins helm, used to install the chart into the test apiserver.
package tools

import (
	_ "helm.sh/helm/v4/cmd/helm"
)
