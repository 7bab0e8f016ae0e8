//go:build tools

// Package tools pins the node and controller binaries the node end-to-end test runs
// (same Kubernetes release as ../kubernetes).
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
