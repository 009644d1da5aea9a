// Package vm holds the kernel tests of zq-csi: netlink NBD attach, I/O
// through /dev/nbdX, restart survival of the serving process, and recovery
// refusing foreign devices. They need a kernel with the nbd module and
// root, which the development machines do not have, so "make test-vm"
// (test/vm/run.sh) boots Debian's own kernel under qemu with an initramfs
// holding busybox, the block modules and these tests built statically, and
// test/vm/init.sh runs them there (ZQ_VM=1) together with a dd comparison
// against qemu-nbd -c in the same VM.
//
// Elsewhere the tests skip with a message naming the missing module; with
// ZQ_VM=1 a missing module is a failure. The restart tests drive the
// zq-csi binary named by ZQ_CSI_BIN ("zq-csi nbd attach|recover|detach").
package vm
