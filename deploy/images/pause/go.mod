// The node's pause (sandbox) image: a static program that holds a pod's namespaces until SIGTERM.
module kaiten.dev/pause

go 1.23.0
