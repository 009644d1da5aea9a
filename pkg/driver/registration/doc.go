// Package registration registers a CSI node plugin with the kubelet by
// itself, for clusters that run no csi-node-driver-registrar sidecar.
//
// # Model
//
// The kubelet's plugin watcher (pkg/kubelet/pluginmanager) watches
// <kubelet root>/plugins_registry for unix sockets. For each one it dials
// the plugin registration API (k8s.io/kubelet/pkg/apis/pluginregistration/v1)
// and asks GetInfo what the plugin is: type CSIPlugin, the driver name, the
// CSI endpoint as the kubelet itself must dial it (a host path, which can
// differ from the path inside the plugin's container), and the CSI versions
// it speaks. The kubelet's CSI handler then validates the versions, calls
// NodeGetInfo on that endpoint, records the driver in the node's CSINode
// object and reports the outcome with NotifyRegistrationStatus. Removing the
// socket unregisters the plugin.
//
// Serve plays the registrar's part: it waits until the local CSI socket
// accepts connections (so the kubelet's NodeGetInfo does not race the
// driver's start), replaces a stale registration socket left by an earlier
// run, serves the API on <dir>/<driver name>-reg.sock until its context
// ends, and removes the socket again.
//
// A refusal is not fatal here. The registrar sidecar exits on one so that
// its pod restarts; the node plugin carries the data path of staged volumes
// and must not, and the kubelet retries a failed registration by itself
// with exponential back-off. Every status reaches the caller through
// Config.OnStatus (a refusal as an error wrapping ErrRefused, with the
// kubelet's reason); the package does not log.
package registration
