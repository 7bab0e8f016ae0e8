//go:build tools

// Package tools pins etcd, the storage behind the test kube-apiserver.
package tools

import (
	_ "go.etcd.io/etcd/server/v3" // package main: the etcd binary
)
