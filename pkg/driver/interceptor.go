package driver

import (
	"context"
	"strings"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"k8s.io/klog/v2"
)

// logInterceptor is the one place that logs gRPC calls and maps errors to
// codes: every call is logged (klog structured) with its secrets stripped,
// Probe only at high verbosity (kubelet and the liveness probe call it
// every few seconds); every error leaves through toStatus.
func logInterceptor(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	start := time.Now()
	v := klog.Level(2)
	if strings.HasSuffix(info.FullMethod, "/Probe") {
		v = 6
	}
	if klog.V(v).Enabled() {
		klog.V(v).InfoS("GRPC call", "method", info.FullMethod, "request", stripSecrets(req))
	}
	resp, err := handler(ctx, req)
	if err != nil {
		err = toStatus(err)
		st, _ := status.FromError(err)
		klog.ErrorS(nil, "GRPC error", "method", info.FullMethod, "code", st.Code(), "message", st.Message(), "duration", time.Since(start))
		return nil, err
	}
	if klog.V(v).Enabled() {
		klog.V(v).InfoS("GRPC response", "method", info.FullMethod, "response", stripSecrets(resp), "duration", time.Since(start))
	}
	return resp, nil
}

// stripSecrets returns a copy of a CSI message with every field that the
// spec marks csi_secret replaced, at any depth, for logging.
func stripSecrets(m any) any {
	pm, ok := m.(proto.Message)
	if !ok {
		return m
	}
	c := proto.Clone(pm)
	strip(c.ProtoReflect())
	return c
}

const strippedValue = "***stripped***"

func strip(m protoreflect.Message) {
	m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		if isSecret(fd) {
			if fd.IsMap() && fd.MapValue().Kind() == protoreflect.StringKind {
				mp := v.Map()
				mp.Range(func(k protoreflect.MapKey, _ protoreflect.Value) bool {
					mp.Set(k, protoreflect.ValueOfString(strippedValue))
					return true
				})
			} else {
				m.Clear(fd)
			}
			return true
		}
		switch {
		case fd.IsMap():
			if fd.MapValue().Message() != nil {
				v.Map().Range(func(_ protoreflect.MapKey, mv protoreflect.Value) bool {
					strip(mv.Message())
					return true
				})
			}
		case fd.IsList():
			if fd.Message() != nil {
				l := v.List()
				for i := 0; i < l.Len(); i++ {
					strip(l.Get(i).Message())
				}
			}
		case fd.Message() != nil:
			strip(v.Message())
		}
		return true
	})
}

func isSecret(fd protoreflect.FieldDescriptor) bool {
	opts := fd.Options()
	if opts == nil {
		return false
	}
	b, ok := proto.GetExtension(opts, csi.E_CsiSecret).(bool)
	return ok && b
}
