#!/bin/sh
# /init of the test VM (busybox sh). Loads the block modules, runs the
# kernel tests and the dd comparison, prints ZQVM: marker lines that
# test/vm/run.sh parses, and powers off.
export PATH=/bin:/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs -o size=1500m tmp /tmp
mkdir -p /var/lock /run
. /zq/env
echo "ZQVM: BEGIN kernel $(uname -r)"

depmod -a "$KREL" 2>/dev/null
# Four preallocated devices: ours are picked by the kernel (CONNECT without
# an index), qemu-nbd -c needs a node to exist. No partition scan.
modprobe nbd nbds_max=4 max_part=0 || echo "ZQVM: MODULE nbd FAILED"
[ -d /sys/module/nbd ] && echo "ZQVM: MODULE nbd loaded"

# Availability of the reference and future devices on this kernel.
if modprobe null_blk nr_devices=1 zoned=1 zone_size=4 gb=1 2>/dev/null; then
  echo "ZQVM: NULLBLK zoned=$(cat /sys/block/nullb0/queue/zoned 2>/dev/null) nr_zones=$(cat /sys/block/nullb0/queue/nr_zones 2>/dev/null)"
  rmmod null_blk
else
  echo "ZQVM: NULLBLK zoned null_blk unavailable"
fi
if modprobe ublk_drv 2>/dev/null; then echo "ZQVM: UBLK ublk_drv loaded"; else echo "ZQVM: UBLK ublk_drv not in this kernel package"; fi


# dd through our device and through qemu-nbd -c, same image format, same
# source data, same VM run; first, while the preallocated /dev/nbd0-3 all
# exist (our detach destroys the device, DESTROY_ON_DISCONNECT). busybox
# dd does not print a rate: time it with /proc/uptime (10 ms resolution; runs take seconds under TCG).
up() { cut -d' ' -f1 /proc/uptime; }
# timedd MIB dd-args...: prints MiB/s
timedd() {
  m=$1; shift
  a=$(up); dd "$@" 2>/dev/null || { echo "dd-failed"; return; }; b=$(up)
  awk -v m="$m" -v a="$a" -v b="$b" 'BEGIN { d = b - a; if (d < 0.01) d = 0.01; printf "%.1f", m / d }'
}
if [ -x /usr/bin/qemu-nbd ]; then
  MIB=$ZQ_VM_MIB
  dd if=/dev/urandom of=/tmp/src bs=1M count=$MIB 2>/dev/null
  /zq/zq-csi img create -f qcow2 /tmp/ours.qcow2 ${MIB}M >/dev/null
  /zq/zq-csi img create -f qcow2 /tmp/theirs.qcow2 ${MIB}M >/dev/null
  /zq/zq-csi nbd attach --state-dir /tmp/ddstate --volume-id dd /tmp/ours.qcow2 > /tmp/dd.dev 2>/tmp/dd.err &
  apid=$!
  for i in $(seq 300); do [ -s /tmp/dd.dev ] && break; sleep 0.1; done
  ours=$(cat /tmp/dd.dev)
  if [ -b "$ours" ]; then
    ow=$(timedd $MIB if=/tmp/src of=$ours bs=1M oflag=direct conv=fsync)
    or=$(timedd $MIB if=$ours of=/dev/null bs=1M iflag=direct)
    /zq/zq-csi nbd detach --state-dir /tmp/ddstate dd
    wait $apid
    # The last free preallocated node.
    theirs=""
    for d in /dev/nbd3 /dev/nbd2 /dev/nbd1 /dev/nbd0; do
      [ -b $d ] && [ "$(cat /sys/block/${d#/dev/}/size)" = 0 ] && theirs=$d && break
    done
    if [ -n "$theirs" ] && qemu-nbd -c $theirs -f qcow2 /tmp/theirs.qcow2 2>/tmp/qn.err; then
      for i in $(seq 100); do [ "$(cat /sys/block/${theirs#/dev/}/size)" != 0 ] && break; sleep 0.1; done
      tw=$(timedd $MIB if=/tmp/src of=$theirs bs=1M oflag=direct conv=fsync)
      tr=$(timedd $MIB if=$theirs of=/dev/null bs=1M iflag=direct)
      qemu-nbd -d $theirs >/dev/null
      echo "ZQVM: DD write ${MIB}MiB bs=1M O_DIRECT: zq-csi $ow MiB/s, qemu-nbd -c $tw MiB/s"
      echo "ZQVM: DD read  ${MIB}MiB bs=1M O_DIRECT: zq-csi $or MiB/s, qemu-nbd -c $tr MiB/s"
      awk -v zw="$ow" -v qw="$tw" -v zr="$or" -v qr="$tr" 'BEGIN { if (qw > 0 && qr > 0) printf "ZQVM: RATIO zq-csi/qemu-nbd write %.2fx read %.2fx\n", zw / qw, zr / qr }'
    else
      echo "ZQVM: DD qemu-nbd -c ${theirs:-(no free /dev/nbdN)} failed: $(cat /tmp/qn.err); zq-csi write $ow read $or MiB/s"
    fi
  else
    echo "ZQVM: DD our attach failed: $(cat /tmp/dd.err)"
  fi
else
  echo "ZQVM: DD skipped: qemu-nbd not in the initramfs"
fi
cd /tmp
# The tests run in the background under a watchdog: a test stuck in the
# kernel (a task in D state waiting on a device nobody serves) cannot be
# ended by Go's own -test.timeout, and must not leave the VM running
# until the host's timeout with nothing said. Past the limit the watchdog
# prints every blocked task's kernel stack and powers off.
( ZQ_VM=1 ZQ_CSI_BIN=/zq/zq-csi ZQ_VM_MIB=$ZQ_VM_MIB /zq/vm.test -test.v -test.count="${ZQ_VM_COUNT:-1}" \
    -test.timeout="${ZQ_VM_TEST_TIMEOUT:-8}m" -test.run "$ZQ_VM_RUN" 2>&1
  echo "ZQVM: GO-TESTS rc=$?" ) &
tests=$!
limit=$(( ${ZQ_VM_TEST_TIMEOUT:-8} * 60 + 30 ))
waited=0
while kill -0 $tests 2>/dev/null; do
  if [ $waited -ge $limit ]; then
    echo "ZQVM: WATCHDOG the tests did not end within ${limit}s; blocked tasks:"
    for t in /proc/[0-9]*/task/[0-9]*; do
      st=$(sed -n 's/^State:[[:space:]]*\([A-Z]\).*/\1/p' $t/status 2>/dev/null)
      [ "$st" = D ] || continue
      echo "ZQVM: WATCHDOG task ${t#/proc/} ($(cat $t/comm 2>/dev/null)) in D state:"
      sed 's/^/ZQVM: WATCHDOG   /' $t/stack 2>/dev/null
    done
    for d in /sys/class/ublk-char/ublkc*; do
      [ -e "$d" ] && echo "ZQVM: WATCHDOG ${d##*/} present"
    done
    echo "ZQVM: GO-TESTS rc=124 (watchdog)"
    break
  fi
  sleep 1
  waited=$((waited + 1))
done
echo "ZQVM: DONE"
sync
poweroff -f
