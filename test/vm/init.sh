#!/bin/sh
# /init of the test VM (busybox sh). Loads the block modules, runs the
# kernel tests (the dd comparison with qemu-nbd -c among them), prints
# ZQVM: marker lines that test/vm/run.sh parses, and powers off.
export PATH=/bin:/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs -o size=2000m tmp /tmp
mkdir -p /var/lock /run
. /zq/env
echo "ZQVM: BEGIN kernel $(uname -r)"

depmod -a "$KREL" 2>/dev/null
# Sixteen preallocated devices: ours are picked by the kernel (CONNECT
# without an index: the lowest free one, destroyed on detach), qemu-nbd -c
# needs a node to exist (the dd comparison takes the highest). No
# partition scan.
modprobe nbd nbds_max=16 max_part=0 || echo "ZQVM: MODULE nbd FAILED"
[ -d /sys/module/nbd ] && echo "ZQVM: MODULE nbd loaded"

# configfs, for null_blk devices with our images' exact geometry (the
# capacity in MiB; module parameters only know whole GiB).
modprobe configfs 2>/dev/null
mkdir -p /sys/kernel/config
mount -t configfs configfs /sys/kernel/config 2>/dev/null
if modprobe null_blk nr_devices=0 2>/dev/null; then
  if [ -d /sys/kernel/config/nullb ]; then
    echo "ZQVM: NULLBLK configfs: zoned null_blk references get our images' geometry (features: $(cat /sys/kernel/config/nullb/features 2>/dev/null | tr '\n' ' '))"
  else
    echo "ZQVM: NULLBLK ******** configfs nullb MISSING: the reference comparisons fall back to module parameters (capacity in whole GiB) ********"
  fi
  rmmod null_blk
else
  echo "ZQVM: NULLBLK ******** null_blk MISSING: the reference comparisons will fail ********"
fi
if modprobe ublk_drv 2>/dev/null; then echo "ZQVM: UBLK ublk_drv loaded"; else echo "ZQVM: UBLK ublk_drv not in this kernel package"; fi

# The dd comparison with qemu-nbd -c is TestDDVsQemuNBD (dd_test.go), the
# first of the Go tests: it needs a free preallocated /dev/nbdN (ours are
# destroyed on detach, DESTROY_ON_DISCONNECT).
cd /tmp
# The tests run in the background under a watchdog: a test stuck in the
# kernel (a task in D state waiting on a device nobody serves) cannot be
# ended by Go's own -test.timeout, and must not leave the VM running
# until the host's timeout with nothing said. Past the limit the watchdog
# prints every blocked task's kernel stack and powers off.
( ZQ_VM=1 ZQ_CONSUMER_RUN="$ZQ_CONSUMER_RUN" ZQ_NULLBLK_COMPLETION_NSEC="$ZQ_NULLBLK_COMPLETION_NSEC" ZQ_CSI_BIN=/zq/zq-csi ZQ_VM_MIB=$ZQ_VM_MIB ZQ_VM_DD_ROUNDS=$ZQ_VM_DD_ROUNDS /zq/vm.test -test.v -test.count="${ZQ_VM_COUNT:-1}" \
    -test.timeout="${ZQ_VM_TEST_TIMEOUT:-20}m" -test.run "$ZQ_VM_RUN" 2>&1
  echo "ZQVM: GO-TESTS rc=$?" ) &
tests=$!
limit=$(( ${ZQ_VM_TEST_TIMEOUT:-20} * 60 + 30 ))
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
