// Package driver is zq-csi's CSI plugin: the Identity, Controller,
// GroupController and Node services (one file each), over a Backend that
// keeps the records and does the image work.
//
// # Model
//
// A volume is a qcow2 image with the zoned extension (pkg/qcow2) on one
// node; its StorageClass parameters are the image's zone.* options plus
// driver options (clusterSize), validated at CreateVolume with messages that
// name the parameter, and limits the format would clamp are refused rather
// than changed. Capacity is rounded up to whole zones, and the zone
// geometry is returned in the volume context. Volumes are Block only.
//
// The controller decides (validation, idempotency by name, per-name and
// per-ID try-locks whose contention is Aborted) and a Backend carries the
// decision out. The local backend (--mode all) keeps JSON records written
// atomically under the state directory and images under the data
// directory.
//
// The cluster backend (DESIGN.md point 7, --backend cluster) keeps the
// records in custom resources (deploy/crds: ZonedVolume, ZonedSnapshot,
// ZonedGroupSnapshot, ZonedNode; client-go's dynamic client, no generated
// code). The controller writes a resource's spec — or deletes it — and
// waits, within the request's deadline, for the NodeAgent of the volume's
// node to make the image agree and say so in status; a deadline that
// passes is DeadlineExceeded and the CO's retry finds the same resource.
// The agent runs beside the node service over the same Images, watches the
// resources labelled with its node, reports errors with their gRPC code
// name (so the controller answers with the node's code), removes the
// finalizer once a deleted resource's image is gone, and keeps its
// ZonedNode's free capacity current for GetCapacity. An image that was
// made and has since vanished is reported, never silently remade.
//
// Snapshots are copies of the image file (a reflink where the file system
// has one, else a sparse copy), so write pointers travel with the data;
// restores and clones are copies of those, grown when asked for more.
// Expansion adds EMPTY zones; limit changes rewrite the zone limits. Where
// pkg/qcow2 cannot yet do either in place, the image is rebuilt: a new
// image gets the data and write pointers and is renamed over the old one.
//
// The node side reaches the kernel only through an nbdattach.Attacher:
// NodeStageVolume opens the volume's zoned device (pkg/zoned) and attaches
// it, NodePublishVolume bind-mounts the device node onto the target file.
// Images is shared by the controller's local backend and the node service,
// so an operation on a staged volume freezes its I/O, closes the device
// (making every acknowledged write and write pointer durable), works on the
// file, and reopens the device; nothing ever opens one image twice.
//
// # Errors and logging
//
// Handlers return errors built around the sentinels of errors.go (or what
// a library returned); the interceptor maps every one to a gRPC code in
// one errors.Is switch (toStatus) and logs each call with klog, secrets
// stripped.
package driver
