// Command imgpack writes a single-layer container image as a docker-archive
// tarball (the `docker save` format that `ctr images import` reads) from
// files on the host, without a container engine. The e2e lane uses it for
// the zq-csi image, the sidecars it builds from source and a test-tools
// image made of Debian's static busybox.
//
//	imgpack -o out.tar -t localhost/zq-csi:0.1.0 -entrypoint /zq-csi \
//	    -add bin/zq-csi:/zq-csi [-link /bin/sh=busybox] [-env K=V] \
//	    [-arch arm64] [-label K=V]
//
// scripts/image.sh uses it for `make image` on machines without a
// container engine; the image it writes has the Dockerfile's layout.
//
// The layer is reproducible: fixed times, owners root, sorted entries.
package main

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"path"
	"sort"
	"strings"
	"time"
)

type multi []string

func (m *multi) String() string     { return strings.Join(*m, ",") }
func (m *multi) Set(v string) error { *m = append(*m, v); return nil }

func main() {
	var (
		out, tag, entry, workdir, arch  string
		adds, links, envs, dirs, labels multi
	)
	flag.StringVar(&out, "o", "", "output tarball")
	flag.StringVar(&tag, "t", "", "image reference (repository:tag)")
	flag.StringVar(&entry, "entrypoint", "", "entrypoint, words separated by spaces")
	flag.StringVar(&workdir, "workdir", "/", "working directory")
	flag.Var(&adds, "add", "HOSTPATH:IMAGEPATH, a regular file (repeatable)")
	flag.Var(&links, "link", "IMAGEPATH=TARGET, a symbolic link (repeatable)")
	flag.Var(&dirs, "dir", "IMAGEPATH, an empty directory (repeatable)")
	flag.Var(&envs, "env", "K=V in the image's environment (repeatable)")
	flag.Var(&labels, "label", "K=V, an image label (repeatable)")
	flag.StringVar(&arch, "arch", "amd64", "the image's architecture (GOARCH spelling: amd64, arm64, ...)")
	flag.Parse()
	if out == "" || tag == "" || !strings.Contains(tag, ":") {
		fmt.Fprintln(os.Stderr, "imgpack: -o and -t repository:tag are required")
		os.Exit(2)
	}
	if err := run(out, tag, entry, workdir, arch, adds, links, dirs, envs, labels); err != nil {
		fmt.Fprintln(os.Stderr, "imgpack:", err)
		os.Exit(1)
	}
}

type entry struct {
	name   string
	hdr    tar.Header
	source string // host file for regular files
}

func run(out, tag, entrypoint, workdir, arch string, adds, links, dirs, envs, labels []string) error {
	lab := map[string]string{}
	for _, l := range labels {
		k, v, ok := strings.Cut(l, "=")
		if !ok || k == "" {
			return fmt.Errorf("-label %q: want KEY=VALUE", l)
		}
		lab[k] = v
	}
	epoch := time.Unix(0, 0)
	entries := map[string]*entry{}
	addDir := func(p string) {
		for p = path.Clean(p); p != "/" && p != "."; p = path.Dir(p) {
			n := strings.TrimPrefix(p, "/") + "/"
			if _, ok := entries[n]; !ok {
				entries[n] = &entry{name: n, hdr: tar.Header{Typeflag: tar.TypeDir, Name: n, Mode: 0o755, ModTime: epoch}}
			}
		}
	}
	addDir("/tmp")
	entries["tmp/"].hdr.Mode = 0o1777
	for _, d := range dirs {
		addDir(d)
	}
	for _, a := range adds {
		src, dst, ok := strings.Cut(a, ":")
		if !ok || !path.IsAbs(dst) {
			return fmt.Errorf("-add %q: want HOSTPATH:/IMAGEPATH", a)
		}
		st, err := os.Stat(src)
		if err != nil {
			return err
		}
		if !st.Mode().IsRegular() {
			return fmt.Errorf("-add %s: not a regular file", src)
		}
		addDir(path.Dir(dst))
		n := strings.TrimPrefix(path.Clean(dst), "/")
		entries[n] = &entry{name: n, source: src, hdr: tar.Header{Typeflag: tar.TypeReg, Name: n,
			Mode: int64(st.Mode().Perm()), Size: st.Size(), ModTime: epoch}}
	}
	for _, l := range links {
		dst, target, ok := strings.Cut(l, "=")
		if !ok || !path.IsAbs(dst) {
			return fmt.Errorf("-link %q: want /IMAGEPATH=TARGET", l)
		}
		addDir(path.Dir(dst))
		n := strings.TrimPrefix(path.Clean(dst), "/")
		entries[n] = &entry{name: n, hdr: tar.Header{Typeflag: tar.TypeSymlink, Name: n, Linkname: target, Mode: 0o777, ModTime: epoch}}
	}
	names := make([]string, 0, len(entries))
	for n := range entries {
		names = append(names, n)
	}
	sort.Strings(names)

	var layer bytes.Buffer
	tw := tar.NewWriter(&layer)
	for _, n := range names {
		e := entries[n]
		e.hdr.Format = tar.FormatPAX
		if err := tw.WriteHeader(&e.hdr); err != nil {
			return err
		}
		if e.source != "" {
			f, err := os.Open(e.source)
			if err != nil {
				return err
			}
			_, err = io.Copy(tw, f)
			f.Close()
			if err != nil {
				return err
			}
		}
	}
	if err := tw.Close(); err != nil {
		return err
	}
	layerSum := sha256.Sum256(layer.Bytes())
	diffID := "sha256:" + hex.EncodeToString(layerSum[:])

	cfg := map[string]any{
		"architecture": arch,
		"os":           "linux",
		"created":      epoch.UTC().Format(time.RFC3339),
		"config": map[string]any{
			"Entrypoint": strings.Fields(entrypoint),
			"Env":        append([]string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}, envs...),
			"WorkingDir": workdir,
			"Labels":     lab,
		},
		"rootfs":  map[string]any{"type": "layers", "diff_ids": []string{diffID}},
		"history": []map[string]any{{"created": epoch.UTC().Format(time.RFC3339), "created_by": "imgpack"}},
	}
	cfgJSON, err := json.Marshal(cfg)
	if err != nil {
		return err
	}
	cfgSum := sha256.Sum256(cfgJSON)
	cfgName := hex.EncodeToString(cfgSum[:]) + ".json"
	layerDir := hex.EncodeToString(layerSum[:])
	manifest, err := json.Marshal([]map[string]any{{
		"Config": cfgName, "RepoTags": []string{tag}, "Layers": []string{layerDir + "/layer.tar"},
	}})
	if err != nil {
		return err
	}

	tmp := out + ".tmp"
	f, err := os.Create(tmp)
	if err != nil {
		return err
	}
	defer os.Remove(tmp)
	ow := tar.NewWriter(f)
	put := func(name string, mode int64, data []byte) error {
		if err := ow.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: mode, Size: int64(len(data)), ModTime: epoch}); err != nil {
			return err
		}
		_, err := ow.Write(data)
		return err
	}
	if err := ow.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: layerDir + "/", Mode: 0o755, ModTime: epoch}); err != nil {
		return err
	}
	for _, p := range []struct {
		name string
		data []byte
	}{
		{layerDir + "/VERSION", []byte("1.0")},
		{layerDir + "/layer.tar", layer.Bytes()},
		{cfgName, cfgJSON},
		{"manifest.json", manifest},
	} {
		if err := put(p.name, 0o644, p.data); err != nil {
			return err
		}
	}
	if err := ow.Close(); err != nil {
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(tmp, out)
}
