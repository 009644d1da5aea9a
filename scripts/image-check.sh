#!/usr/bin/env bash
# make image-check: the Dockerfile builds for real, and the image it makes is
# the one `make image` packs without an engine (the e2e lane and CI use that
# path), file for file.
#
# No registry is reachable here, so the Dockerfile's FROM images are
# replaced by local ones (its GO_IMAGE and BUSYBOX_IMAGE build arguments):
# a Go image made from this machine's Go toolchain and Debian's static
# busybox (from scratch, no pull), and a busybox image of that same busybox.
# The modules come from the host's module cache, lent to the build as a
# GOPROXY=file:// directory, and the build has no network (--network none:
# buildah's default CNI network would leave a bridge and CNI-* iptables
# chains behind, which the e2e lane's leftover check rightly flags). Then:
#   - both images have the same files (path, type, mode, link target,
#     content hash: Go builds are reproducible, so /zq-csi is byte-identical),
#     entrypoint, environment, labels and architecture;
#   - the Dockerfile's image runs on its own: its /zq-csi prints its version
#     and its shell finds mount, umount and modprobe (chroot into its rootfs).
# Needs buildah (apt-get install buildah) and root; without buildah it says
# so and skips, and under ZQ_REQUIRE_PEERS=1 it fails instead.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export PATH=/usr/local/go/bin:$PATH
start=$(date +%s)
step() { printf '\n=== [image-check %4ds] %s\n' "$(( $(date +%s) - start ))" "$*"; }
if ! command -v buildah >/dev/null || ! buildah info >/dev/null 2>&1; then
  msg="SKIP: make image-check needs a working buildah (apt-get install buildah; run as root)"
  [ "${ZQ_REQUIRE_PEERS:-0}" = 1 ] && { echo "${msg/SKIP/FAIL} (ZQ_REQUIRE_PEERS=1)" >&2; exit 1; }
  echo "$msg" >&2; exit 0
fi
bb=""
for b in /bin/busybox /usr/bin/busybox; do
  if [ -x "$b" ] && ! ldd "$b" >/dev/null 2>&1; then bb=$b; break; fi
done
[ -n "$bb" ] || { echo "image-check: no static busybox: apt-get install busybox-static" >&2; exit 1; }
work=$(mktemp -d /tmp/zq-image-check.XXXXXX)
ctr=""
cleanup() {
  [ -n "$ctr" ] && buildah rm "$ctr" >/dev/null 2>&1
  buildah rmi -f localhost/zq-check-go:local localhost/zq-check-busybox:local localhost/zq-check:dockerfile >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

step "local base images (no registry): Go $(go env GOVERSION) from $(go env GOROOT), Debian's static busybox"
go build -C test/e2e/tools -trimpath -buildvcs=false -o "$work/imgpack" ./imgpack
"$work/imgpack" -o "$work/busybox.tar" -t localhost/zq-check-busybox:local -entrypoint /bin/sh \
  -add "$bb:/bin/busybox" -link /bin/sh=busybox
buildah pull -q "docker-archive:$work/busybox.tar" >/dev/null
ctr=$(buildah from scratch)
mnt=$(buildah mount "$ctr")
mkdir -p "$mnt/usr/local" "$mnt/bin" "$mnt/tmp" "$mnt/etc/ssl/certs" "$mnt/root"
chmod 1777 "$mnt/tmp"
cp -a "$(go env GOROOT)" "$mnt/usr/local/go"
cp "$bb" "$mnt/bin/busybox"
for a in sh ln mkdir chmod cat ls; do ln -s busybox "$mnt/bin/$a"; done
buildah umount "$ctr" >/dev/null
buildah config --env PATH=/go/bin:/usr/local/go/bin:/bin --env GOPATH=/go --env GOTOOLCHAIN=local \
  --env GOFLAGS=-mod=mod --env GOSUMDB=off "$ctr"
buildah commit -q "$ctr" localhost/zq-check-go:local >/dev/null
buildah rm "$ctr" >/dev/null; ctr=""

step "the Dockerfile, built by buildah (make image with ZQ_IMAGE_ENGINE=buildah)"
modcache=$(go env GOMODCACHE)
go mod download
ZQ_IMAGE_ENGINE=buildah IMAGE_REPO=localhost/zq-check IMAGE_TAG=dockerfile \
  GO_IMAGE=localhost/zq-check-go:local BUSYBOX_IMAGE=localhost/zq-check-busybox:local \
  GOPROXY=file:///goproxy ZQ_IMAGE_BUILD_FLAGS="--network none -v $modcache/cache/download:/goproxy:ro" \
  bash scripts/image.sh --out "$work/dockerfile" | grep '^\[image\] localhost'

step "the same image packed without an engine (make image with ZQ_IMAGE_ENGINE=imgpack)"
ZQ_IMAGE_ENGINE=imgpack IMAGE_REPO=localhost/zq-check IMAGE_TAG=dockerfile \
  bash scripts/image.sh --out "$work/pack" | grep '^\[image\] localhost'

step "compare: files, entrypoint, environment, labels, architecture"
arch=$(go env GOARCH)
python3 - "$work/dockerfile/zq-csi-dockerfile-linux-$arch.tar" "$work/pack/zq-csi-dockerfile-linux-$arch.tar" "$work/rootfs" <<'PY'
import hashlib, io, json, os, sys, tarfile
def load(path):
    outer = tarfile.open(path)
    man = json.load(outer.extractfile("manifest.json"))[0]
    cfg = json.load(outer.extractfile(man["Config"]))
    files = {}
    for layer in man["Layers"]:
        lt = tarfile.open(fileobj=io.BytesIO(outer.extractfile(layer).read()))
        for m in lt.getmembers():
            name = "/" + m.name.lstrip("./").rstrip("/")
            base = os.path.basename(name)
            if base.startswith(".wh."):  # whiteouts
                files.pop(os.path.join(os.path.dirname(name), base[4:]), None); continue
            kind = "dir" if m.isdir() else "link" if m.issym() else "file" if m.isfile() else m.type.decode()
            digest = hashlib.sha256(lt.extractfile(m).read()).hexdigest()[:16] if m.isfile() else ""
            files[name] = (kind, oct(m.mode & 0o7777), m.linkname, digest)
    c = cfg.get("config", {})
    meta = {"architecture": cfg.get("architecture"), "os": cfg.get("os"), "Entrypoint": c.get("Entrypoint"),
            # buildah stamps its own version: not part of the recipe.
            "Env": c.get("Env"), "Labels": {k: v for k, v in (c.get("Labels") or {}).items() if not k.startswith("io.buildah.")}}
    return files, meta, outer, man
(df, dm, douter, dman), (pf, pm, _, _) = load(sys.argv[1]), load(sys.argv[2])
bad = 0
for n in sorted(set(df) | set(pf)):
    a, b = df.get(n), pf.get(n)
    if a != b:
        print(f"DIFFER {n}: Dockerfile {a}, packer {b}"); bad += 1
for k in dm:
    if dm[k] != pm[k]:
        print(f"DIFFER config {k}: Dockerfile {dm[k]}, packer {pm[k]}"); bad += 1
for n in sorted(df):
    print("  %-16s %-5s %s %s%s" % (n, df[n][0], df[n][1], ("-> " + df[n][2]) if df[n][2] else "", ("sha256 " + df[n][3]) if df[n][3] else ""))
print("  config:", json.dumps(dm))
if bad:
    print(f"{bad} differences"); sys.exit(1)
print("same files and config")
# The Dockerfile image's rootfs, for the run check.
os.makedirs(sys.argv[3])
for layer in dman["Layers"]:
    tarfile.open(fileobj=io.BytesIO(douter.extractfile(layer).read())).extractall(sys.argv[3])
PY

step "the Dockerfile's image runs on its own (chroot into its rootfs)"
chroot "$work/rootfs" /zq-csi version
chroot "$work/rootfs" /bin/sh -c 'for c in mount umount modprobe; do command -v $c; done; mount --help 2>&1 | head -1'
# Nothing of buildah's networking left (see --network none above).
if ip -br link 2>/dev/null | grep -q '^cni-podman' || iptables -S 2>/dev/null | grep -q '^-N CNI-'; then
  echo "image-check: buildah left a CNI bridge or CNI-* iptables chains behind" >&2; exit 1
fi
echo; echo "image-check: ok ($(( $(date +%s) - start ))s)"
