//go:build tools

// Package tools pins the main packages this module builds: etcd and kube-apiserver (the control
// plane of the tests and `kaiten up`), and kube-controller-manager, kube-scheduler and the kubelet
// (the single-node cluster of shared/local/node.py, built only when a node is asked for).
package tools

import (
	_ "go.etcd.io/etcd/server/v3"
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
