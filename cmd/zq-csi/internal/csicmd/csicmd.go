// Package csicmd is `zq-csi csi`: a small CSI client for debugging a running
// driver by hand, in the spirit of csc (github.com/rexray/gocsi). Each
// subcommand is one CSI call over gRPC, printed in a few lines (or, with
// -o json, the response as protobuf JSON); gRPC errors are printed with
// their code. `make demo` drives a whole volume lifecycle with it.
package csicmd

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"sort"
	"strings"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"k8s.io/apimachinery/pkg/api/resource"

	"github.com/zq-csi/zq-csi/cmd/zq-csi/internal/volumecmd"
)

// Exit codes.
const (
	ExitOK    = 0
	ExitError = 1 // the call failed (the gRPC code is printed)
	ExitUsage = 2
)

// Env is what the command needs from its process.
type Env struct {
	Stdout, Stderr io.Writer
	Getenv         func(string) string // nil: no environment
}

const usage = `Usage: zq-csi csi [--endpoint URL] [--timeout D] [-o text|json] <command> [flags] [args]

A CSI client for a running driver (zq-csi serve): one CSI call per command.

Commands:
  info                                  GetPluginInfo, GetPluginCapabilities, Probe,
                                        ControllerGetCapabilities, NodeGetInfo
  create NAME --size Q [--param K=V]... [--from-snapshot ID | --from-volume ID]
                                        CreateVolume (raw block, single-node writer);
                                        --param takes StorageClass parameters
  delete VOLUME-ID                      DeleteVolume
  snapshot NAME --source VOLUME-ID      CreateSnapshot
  delete-snapshot SNAPSHOT-ID           DeleteSnapshot
  list                                  ListVolumes and ListSnapshots
  capacity [--param K=V]...             GetCapacity
  stage VOLUME-ID --staging-path DIR [--context K=V]... [--read-only]
                                        NodeStageVolume (--context: the volume context
                                        create printed)
  publish VOLUME-ID --staging-path DIR --target-path FILE [--read-only]
                                        NodePublishVolume: FILE becomes the device
  unpublish VOLUME-ID --target-path FILE
  unstage VOLUME-ID --staging-path DIR

Global flags:
  --endpoint URL   unix:///path/csi.sock or tcp://host:port (default $CSI_ENDPOINT,
                   else unix:///csi/csi.sock)
  --timeout D      per call (default 60s)
  -o FORMAT        text (default), json (the response), or id (create and
                   snapshot: only the new ID, for scripts)

Exit status: 0 success, 1 the call failed, 2 usage.
`

type globals struct {
	endpoint, output string
	timeout          time.Duration
}

// kv is a repeatable K=V flag.
type kv struct {
	name string
	m    map[string]string
}

func (f *kv) String() string { return "" }
func (f *kv) Set(v string) error {
	k, val, ok := strings.Cut(v, "=")
	if !ok || k == "" {
		return fmt.Errorf("--%s %q: want KEY=VALUE", f.name, v)
	}
	if f.m == nil {
		f.m = map[string]string{}
	}
	f.m[k] = val
	return nil
}

// Main runs `zq-csi csi ARGS...` and returns the exit status.
func Main(args []string, env Env) int {
	getenv := env.Getenv
	if getenv == nil {
		getenv = func(string) string { return "" }
	}
	g := globals{endpoint: getenv("CSI_ENDPOINT"), output: "text", timeout: 60 * time.Second}
	if g.endpoint == "" {
		g.endpoint = "unix:///csi/csi.sock"
	}
	fs := flag.NewFlagSet("zq-csi csi", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.StringVar(&g.endpoint, "endpoint", g.endpoint, "")
	fs.DurationVar(&g.timeout, "timeout", g.timeout, "")
	fs.StringVar(&g.output, "o", g.output, "")
	fs.StringVar(&g.output, "output", g.output, "")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fmt.Fprint(env.Stdout, usage)
			return ExitOK
		}
		fmt.Fprintf(env.Stderr, "zq-csi csi: %v\n%s", err, usage)
		return ExitUsage
	}
	rest := fs.Args()
	if len(rest) == 0 || rest[0] == "help" {
		if len(rest) == 0 {
			fmt.Fprint(env.Stderr, usage)
			return ExitUsage
		}
		fmt.Fprint(env.Stdout, usage)
		return ExitOK
	}
	switch g.output {
	case "text", "json", "id":
	default:
		fmt.Fprintf(env.Stderr, "zq-csi csi: -o %q: want text, json or id\n", g.output)
		return ExitUsage
	}
	c, ok := commands[rest[0]]
	if !ok {
		fmt.Fprintf(env.Stderr, "zq-csi csi: unknown command %q\n%s", rest[0], usage)
		return ExitUsage
	}
	cmd := &call{g: g, stdout: env.Stdout, stderr: env.Stderr, name: rest[0]}
	fs = flag.NewFlagSet("zq-csi csi "+rest[0], flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	run := c(cmd, fs)
	pos, err := volumecmd.ParseInterspersed(fs, rest[1:])
	if err != nil {
		fmt.Fprintf(env.Stderr, "zq-csi csi %s: %v (see zq-csi csi --help)\n", rest[0], err)
		return ExitUsage
	}
	if err := run(pos); err != nil {
		var u usageError
		if errors.As(err, &u) {
			fmt.Fprintf(env.Stderr, "zq-csi csi %s: %v (see zq-csi csi --help)\n", rest[0], err)
			return ExitUsage
		}
		if st, ok := status.FromError(err); ok && st.Code() != 0 {
			fmt.Fprintf(env.Stderr, "zq-csi csi %s: %s: %s\n", rest[0], st.Code(), st.Message())
		} else {
			fmt.Fprintf(env.Stderr, "zq-csi csi %s: %v\n", rest[0], err)
		}
		return ExitError
	}
	return ExitOK
}

type usageError struct{ error }

func usagef(format string, a ...any) error { return usageError{fmt.Errorf(format, a...)} }

// call is one command's state: the connection is made on first use.
type call struct {
	g              globals
	stdout, stderr io.Writer
	name           string
	conn           *grpc.ClientConn
}

func (c *call) dial() (*grpc.ClientConn, error) {
	if c.conn != nil {
		return c.conn, nil
	}
	target, err := grpcTarget(c.g.endpoint)
	if err != nil {
		return nil, err
	}
	conn, err := grpc.NewClient(target, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, fmt.Errorf("--endpoint %s: %w", c.g.endpoint, err)
	}
	c.conn = conn
	return conn, nil
}

// grpcTarget maps a CSI endpoint (unix:///path, tcp://host:port) to a gRPC
// target name.
func grpcTarget(ep string) (string, error) {
	switch {
	case strings.HasPrefix(ep, "unix://"):
		p := strings.TrimPrefix(ep, "unix://")
		if p == "" || !strings.HasPrefix(p, "/") {
			return "", fmt.Errorf("--endpoint %q: want unix:///absolute/path", ep)
		}
		return "unix://" + p, nil
	case strings.HasPrefix(ep, "tcp://"):
		hp := strings.TrimPrefix(ep, "tcp://")
		if hp == "" {
			return "", fmt.Errorf("--endpoint %q: want tcp://host:port", ep)
		}
		return "dns:///" + hp, nil
	case strings.HasPrefix(ep, "/"):
		return "unix://" + ep, nil
	}
	return "", fmt.Errorf("--endpoint %q: want unix:///path or tcp://host:port", ep)
}

func (c *call) ctx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), c.g.timeout)
}

// out prints a response: its JSON with -o json, else the text lines.
func (c *call) out(m proto.Message, lines ...string) error {
	if c.g.output == "json" {
		b, err := protojson.MarshalOptions{Multiline: true, Indent: "  "}.Marshal(m)
		if err != nil {
			return err
		}
		fmt.Fprintln(c.stdout, string(b))
		return nil
	}
	for _, l := range lines {
		fmt.Fprintln(c.stdout, l)
	}
	return nil
}

type command func(c *call, fs *flag.FlagSet) func(args []string) error

var commands = map[string]command{
	"info":            infoCmd,
	"create":          createCmd,
	"delete":          deleteCmd,
	"snapshot":        snapshotCmd,
	"delete-snapshot": deleteSnapshotCmd,
	"list":            listCmd,
	"capacity":        capacityCmd,
	"stage":           stageCmd,
	"publish":         publishCmd,
	"unpublish":       unpublishCmd,
	"unstage":         unstageCmd,
}

// oneArg checks that exactly one positional argument, named what, is given.
func oneArg(args []string, what string) (string, error) {
	if len(args) != 1 || args[0] == "" {
		return "", usagef("want one %s, got %d arguments", what, len(args))
	}
	return args[0], nil
}

func noArgs(args []string) error {
	if len(args) != 0 {
		return usagef("takes no arguments, got %q", args)
	}
	return nil
}

// blockCap is the only capability zq-csi volumes have: raw block, one node.
func blockCap(ro bool) *csi.VolumeCapability {
	mode := csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER
	if ro {
		mode = csi.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY
	}
	return &csi.VolumeCapability{
		AccessType: &csi.VolumeCapability_Block{Block: &csi.VolumeCapability_BlockVolume{}},
		AccessMode: &csi.VolumeCapability_AccessMode{Mode: mode},
	}
}

// sortedKV prints a map as sorted "  k=v" lines.
func sortedKV(indent string, m map[string]string) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	out := make([]string, 0, len(keys))
	for _, k := range keys {
		out = append(out, indent+k+"="+m[k])
	}
	return out
}

// bytesText prints a size in bytes with its binary unit.
func bytesText(n int64) string {
	q := resource.NewQuantity(n, resource.BinarySI)
	return fmt.Sprintf("%s (%d bytes)", q.String(), n)
}

func parseSize(flagName, v string) (int64, error) {
	q, err := resource.ParseQuantity(v)
	if err != nil || q.Sign() <= 0 {
		return 0, usagef("--%s %q: want a positive size such as 512Mi or 1Gi", flagName, v)
	}
	n, ok := q.AsInt64()
	if !ok {
		return 0, usagef("--%s %q: does not fit in 64 bits", flagName, v)
	}
	return n, nil
}
