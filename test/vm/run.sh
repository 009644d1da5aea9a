#!/usr/bin/env bash
# The VM lane (make test-vm): boots Debian's own kernel under qemu with an
# initramfs of busybox, the kernel's block modules and our static test
# binaries, runs the kernel tests of test/vm there, and reports through
# marker lines on the serial console. Needs only Debian packages:
#   qemu-system-x86 busybox-static (qemu-utils for the qemu-nbd comparison;
#   fio, util-linux's blkzone and btrfs-progs for the ublk zone checks)
# The kernel package is fetched with apt-get download and cached outside
# the work tree, keyed by its version.
#
# Environment:
#   ZQ_VM_CACHE        cache root (default $ZQ_CACHE/vm, ZQ_CACHE defaulting to /var/cache/zq-csi)
#   ZQ_VM_ACCEL        tcg (default) or kvm
#   ZQ_VM_TIMEOUT      seconds before the VM is killed (default 1800)
#   ZQ_VM_MIB          MiB written per I/O test and per dd run (default 64)
#   ZQ_VM_DD_ROUNDS    alternating rounds of the dd comparison with
#                      qemu-nbd -c (default 3; the median ratio is reported)
#   ZQ_VM_KERNEL_PKG   a kernel package to use instead of the one
#                      linux-image-6.12-amd64 depends on (said out loud)
#   ZQ_VM_RUN          -test.run pattern for the in-VM Go tests
#   ZQ_CONSUMER_RUN    regexp on "<workload> <geometry>" choosing the consumer lane's comparisons
#   ZQ_VM_COUNT        -test.count for them (default 1; raise it to hunt races)
#   ZQ_VM_TEST_TIMEOUT minutes for them (default 20); a watchdog in the VM
#                      reports blocked tasks and powers off 30 s later
#   ZQ_REQUIRE_VM=1 or ZQ_REQUIRE_PEERS=1: a missing tool fails instead of skipping
set -euo pipefail
cd "$(dirname "$0")/../.."
export PATH=/usr/local/go/bin:$PATH

say() { printf '[test-vm] %s\n' "$*"; }
skip_or_fail() {
  printf '\n[test-vm] ******** SKIPPED: %s ********\n\n' "$*" >&2
  if [ "${ZQ_REQUIRE_VM:-${ZQ_REQUIRE_PEERS:-0}}" = 1 ]; then
    echo "[test-vm] FAIL: required (ZQ_REQUIRE_VM/ZQ_REQUIRE_PEERS=1)" >&2
    exit 1
  fi
  exit 0
}

command -v qemu-system-x86_64 >/dev/null || skip_or_fail "qemu-system-x86_64 not installed (apt-get install qemu-system-x86)"
BUSYBOX=""
for b in /bin/busybox /usr/bin/busybox; do
  # ldd fails on a static binary: that is the one that runs without libc.
  if [ -x "$b" ] && ! ldd "$b" >/dev/null 2>&1; then BUSYBOX=$b; break; fi
done
[ -n "$BUSYBOX" ] || skip_or_fail "no static busybox (apt-get install busybox-static)"
command -v apt-get >/dev/null || skip_or_fail "apt-get missing: the kernel comes from Debian's packages"

CACHE=${ZQ_VM_CACHE:-${ZQ_CACHE:-/var/cache/zq-csi}/vm}
mkdir -p "$CACHE"
t0=$(date +%s)

# --- kernel: the package Debian 12's linux-image-6.12-amd64 depends on
# (6.12 has nbd, zoned null_blk with configfs and ublk with zoned support),
# from the distribution's own updates. Anything else is said out loud:
# ZQ_VM_KERNEL_PKG names a package; without linux-image-6.12-amd64 the
# lane falls back to what linux-image-amd64 depends on (6.1: no zoned ublk,
# those tests then fail in the VM) -----------------------------------------
KMETA=linux-image-6.12-amd64
loud() { printf '\n[test-vm] ******** %s ********\n\n' "$*" >&2; }
if ! apt-cache show "$KMETA" >/dev/null 2>&1; then apt-get update -qq || true; fi
if [ -n "${ZQ_VM_KERNEL_PKG:-}" ]; then
  KPKG=$ZQ_VM_KERNEL_PKG
  loud "kernel package from ZQ_VM_KERNEL_PKG: $KPKG (not what $KMETA depends on)"
else
  KPKG=$(apt-cache depends "$KMETA" 2>/dev/null | awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ {print $2; exit}')
  if [ -z "$KPKG" ]; then
    KPKG=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ {print $2; exit}')
    [ -n "$KPKG" ] || skip_or_fail "apt knows neither $KMETA nor linux-image-amd64 (run apt-get update; Debian 12 with bookworm-updates or bookworm-security)"
    loud "FALLBACK: apt has no $KMETA (Debian 12's 6.12 kernel, from bookworm-updates/bookworm-security): using $KPKG, what linux-image-amd64 depends on; the zoned ublk tests need Linux >= 6.6 and will fail"
  fi
fi
KVER_PKG=$(apt-cache policy "$KPKG" | awk '/Candidate:/{print $2}')
KDIR="$CACHE/$KPKG-$KVER_PKG"
if [ ! -f "$KDIR/.complete" ]; then
  say "fetching $KPKG $KVER_PKG into $KDIR"
  rm -rf "$KDIR"; mkdir -p "$KDIR/dl"
  (cd "$KDIR/dl" && apt-get download "$KPKG" >/dev/null 2>&1) || { rm -rf "$KDIR"; echo "apt-get download $KPKG failed" >&2; exit 1; }
  dpkg-deb -x "$KDIR"/dl/*.deb "$KDIR/x"
  KREL=$(ls "$KDIR/x/lib/modules")
  cp "$KDIR/x/boot/vmlinuz-$KREL" "$KDIR/vmlinuz"
  mkdir -p "$KDIR/modules/$KREL"
  # The block drivers the tests load, and what they need; decompressed.
  (cd "$KDIR/x/lib/modules/$KREL" && cp --parents modules.order modules.builtin modules.builtin.modinfo \
     kernel/drivers/block/nbd.ko* kernel/drivers/block/loop.ko* \
     kernel/drivers/block/null_blk/null_blk.ko* kernel/fs/configfs/configfs.ko* "$KDIR/modules/$KREL/")
  (cd "$KDIR/x/lib/modules/$KREL" && cp --parents kernel/drivers/block/ublk_drv.ko* "$KDIR/modules/$KREL/" 2>/dev/null) || true
  find "$KDIR/modules" -name '*.ko.xz' -exec xz -d {} + ; find "$KDIR/modules" -name '*.ko.zst' -exec zstd -q -d --rm {} +
  echo "$KREL" > "$KDIR/release"
  rm -rf "$KDIR/x" "$KDIR/dl"
  touch "$KDIR/.complete"
fi
KREL=$(cat "$KDIR/release")
say "kernel $KREL ($KPKG $KVER_PKG) from $KDIR"
# Modules added to a cache made before they were needed, each set under
# its own marker: btrfs (and what it needs) for the zoned file system check
# on ublk; f2fs and zonefs (with lz4, crc32) for the consumer lane
# (consumer_test.go). Optional: a missing one makes its tests fail loudly.
fetch_modules() { # marker module-paths...
  local mark=$1; shift
  [ -f "$KDIR/$mark" ] && return 0
  local T; T=$(mktemp -d)
  (cd "$T" && apt-get download "$KPKG" >/dev/null 2>&1 && dpkg-deb -x ./*.deb x) || { rm -rf "$T"; return 1; }
  (cd "$T/x/lib/modules/$KREL" && for m in "$@"; do
     for f in kernel/$m.ko*; do if [ -f "$f" ]; then cp --parents "$f" "$KDIR/modules/$KREL/"; fi; done
   done)
  rm -rf "$T"
  find "$KDIR/modules" -name '*.ko.xz' -exec xz -d {} + ; find "$KDIR/modules" -name '*.ko.zst' -exec zstd -q -d --rm {} +
  ls "$KDIR/modules/$KREL/kernel/$1.ko" >/dev/null 2>&1 && touch "$KDIR/$mark"
}
fetch_modules .btrfs fs/btrfs/btrfs crypto/xor lib/raid6/raid6_pq lib/libcrc32c crypto/crc32c_generic arch/x86/crypto/crc32c-intel ||
  say "btrfs module unavailable: the zoned file system checks will fail"
fetch_modules .consumerfs fs/f2fs/f2fs fs/zonefs/zonefs lib/lz4/lz4_compress lib/lz4/lz4hc_compress crypto/crc32_generic ||
  say "f2fs/zonefs modules unavailable: the consumer lane's f2fs workloads will fail"

# --- initramfs ---------------------------------------------------------------
W=$(mktemp -d /tmp/zq-vm.XXXXXX)
trap 'rm -rf "$W"' EXIT
R="$W/root"
mkdir -p "$R"/{bin,sbin,dev,proc,sys,tmp,etc,zq,lib/modules}
cp "$BUSYBOX" "$R/bin/busybox"
for app in $("$BUSYBOX" --list); do [ -e "$R/bin/$app" ] || ln -s busybox "$R/bin/$app"; done
cp -a "$KDIR/modules/$KREL" "$R/lib/modules/"
say "building static test binaries"
CGO_ENABLED=0 go test -c -o "$R/zq/vm.test" ./test/vm/
CGO_ENABLED=0 go build -o "$R/zq/zq-csi" ./cmd/zq-csi
# qemu-nbd for the throughput comparison, with its shared libraries.
if command -v qemu-nbd >/dev/null; then
  QN=$(command -v qemu-nbd)
  mkdir -p "$R/usr/bin"; cp "$QN" "$R/usr/bin/qemu-nbd"
  ldd "$QN" | awk '$1 ~ /^\// {print $1} /=>/ {print $3}' | while read -r lib; do
    [ -f "$lib" ] && mkdir -p "$R$(dirname "$lib")" && cp -L "$lib" "$R$lib"
  done
else
  say "qemu-nbd not installed (apt-get install qemu-utils): the throughput comparison will be skipped"
fi
# blkzone and fio (zonemode=zbd) for the ublk tests, with their libraries;
# the tests skip what is missing.
for tool in blkzone fio mkfs.btrfs btrfs mkfs.f2fs fsck.f2fs; do
  if T=$(command -v $tool); then
    mkdir -p "$R/usr/bin"; cp "$T" "$R/usr/bin/$tool"
    ldd "$T" | awk '$1 ~ /^\// {print $1} /=>/ {print $3}' | while read -r lib; do
      if [ -f "$lib" ] && [ ! -e "$R$lib" ]; then mkdir -p "$R$(dirname "$lib")"; cp -L "$lib" "$R$lib"; fi
    done
  else
    case $tool in blkzone) p=util-linux ;; mkfs.btrfs|btrfs) p=btrfs-progs ;; mkfs.f2fs|fsck.f2fs) p=f2fs-tools ;; *) p=$tool ;; esac
    say "$tool not installed (apt-get install $p): its ublk checks will be skipped"
  fi
done
cp test/vm/init.sh "$R/init"; chmod +x "$R/init"
cat > "$R/zq/env" <<EOF
ZQ_VM_MIB=${ZQ_VM_MIB:-64}
ZQ_VM_DD_ROUNDS=${ZQ_VM_DD_ROUNDS:-3}
ZQ_VM_RUN='${ZQ_VM_RUN:-.}'
ZQ_CONSUMER_RUN='${ZQ_CONSUMER_RUN:-}'
ZQ_NULLBLK_COMPLETION_NSEC='${ZQ_NULLBLK_COMPLETION_NSEC:-}'
ZQ_VM_COUNT=${ZQ_VM_COUNT:-1}
ZQ_VM_TEST_TIMEOUT=${ZQ_VM_TEST_TIMEOUT:-20}
KREL=$KREL
EOF
(cd "$R" && find . | "$BUSYBOX" cpio -o -H newc 2>/dev/null | gzip -1 > "$W/initrd.gz")
say "initramfs $(du -h "$W/initrd.gz" | cut -f1); prepared in $(( $(date +%s) - t0 ))s"

# --- boot ---------------------------------------------------------------------
# TCG by default: on these machines /dev/kvm exists but a KVM guest hangs
# after the BIOS (nested virtualisation), while TCG boots in about 2 s.
ACCEL=${ZQ_VM_ACCEL:-tcg}
case $ACCEL in
  kvm) QACCEL=(-accel kvm -cpu host) ;;
  *)   QACCEL=(-accel tcg -cpu max) ;;
esac
LOG="$W/console.log"
say "booting with $ACCEL (log: console)"
t1=$(date +%s)
# A kernel that dies before it runs our /init is booted again, at most
# twice, saying so: under multi-threaded TCG the guest kernel's own code
# patching at boot (int3-based text_poke) has been seen to oops in
# sched_clock_cpu before any of our code ran. A failure after our /init
# started (its "ZQVM: BEGIN" line, which may follow the firmware's screen
# escapes on the same line) is never retried.
for boot in 1 2 3; do
  set +e
  timeout "${ZQ_VM_TIMEOUT:-1800}" qemu-system-x86_64 "${QACCEL[@]}" -m "${ZQ_VM_MEM:-3072}" -smp 2 -nographic -no-reboot \
    -kernel "$KDIR/vmlinuz" -initrd "$W/initrd.gz" \
    -append "console=ttyS0 panic=-1 quiet loglevel=4 rdinit=/init" </dev/null 2>&1 | tee "$LOG" | sed -u 's/^/  vm| /'
  qrc=${PIPESTATUS[0]}
  set -e
  if grep -q 'ZQVM: BEGIN' "$LOG" || [ "$qrc" = 124 ] || [ $boot = 3 ]; then
    break
  fi
  cp "$LOG" "$W/console-boot$boot.log"
  printf '\n[test-vm] ******** the guest kernel died before /init (boot %d, qemu exit %s; log %s): booting again ********\n\n' \
    "$boot" "$qrc" "$W/console-boot$boot.log" >&2
done
t2=$(date +%s)
if [ "$ACCEL" = kvm ] && grep -q "failed to initialize kvm\|Could not access KVM" "$LOG"; then
  say "KVM unusable; rerun with ZQ_VM_ACCEL=tcg"
fi

# --- verdict ------------------------------------------------------------------
tr -d '\r' < "$LOG" > "$W/clean.log"
echo
say "==== summary ($ACCEL, kernel $KREL, VM ran $((t2 - t1))s, total $((t2 - t0))s) ===="
grep -E '^(--- (PASS|FAIL|SKIP)|    --- (PASS|FAIL|SKIP))' "$W/clean.log" | sed 's/^/[test-vm]   /' || true
grep -E '^ZQVM: (RESTART|RESIZE|DD|RATIO|ZONED|UBLK|NULLBLK|MODULE|WATCHDOG|IO-FLUSHER|CONSUMER|QUEUE)' "$W/clean.log" | sed 's/^ZQVM: /[test-vm]   /' || true
if ! grep -q '^ZQVM: DONE' "$W/clean.log"; then
  say "FAIL: the VM did not finish (qemu exit $qrc; timeout ${ZQ_VM_TIMEOUT:-1800}s)"
  exit 1
fi
rc=$(sed -n 's/^ZQVM: GO-TESTS rc=\([0-9]*\).*/\1/p' "$W/clean.log" | tail -1)
npass=$(grep -cE '^\s*--- PASS' "$W/clean.log" || true)
nfail=$(grep -cE '^\s*--- FAIL' "$W/clean.log" || true)
nskip=$(grep -cE '^\s*--- SKIP' "$W/clean.log" || true)
echo "vm: $npass passed, $nfail failed, $nskip skipped"
if [ "$rc" != 0 ] || [ "$nfail" != 0 ] || [ "$npass" = 0 ]; then
  say "FAIL"
  exit 1
fi
if [ "$nskip" != 0 ]; then
  # In the VM only a host tool run.sh could not copy in (blkzone, fio,
  # mkfs.btrfs) or a module the kernel package lacks skips a test.
  grep -E -A1 '^\s*--- SKIP' "$W/clean.log" | sed 's/^/[test-vm]   /' >&2
  if [ "${ZQ_REQUIRE_VM:-${ZQ_REQUIRE_PEERS:-0}}" = 1 ]; then
    say "FAIL: $nskip in-VM test(s) skipped (ZQ_REQUIRE_VM/ZQ_REQUIRE_PEERS=1)"
    exit 1
  fi
fi
say "PASS"
