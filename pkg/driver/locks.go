package driver

import "sync"

// keyLocks is a set of per-key try-locks (topolvm's LockByID). A CSI call
// that finds its volume busy returns Aborted at once rather than queueing:
// the CO retries with backoff, and a stuck operation never piles up
// goroutines behind it (CSI spec, "Concurrency").
type keyLocks struct {
	mu   sync.Mutex
	held map[string]struct{}
}

func newKeyLocks() *keyLocks { return &keyLocks{held: map[string]struct{}{}} }

// tryLock takes every key or none. It returns an ErrBusy error naming the
// busy key, or an unlock function.
func (l *keyLocks) tryLock(keys ...string) (func(), error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, k := range keys {
		if _, busy := l.held[k]; busy {
			return nil, errorf(ErrBusy, "an operation on %s is already in progress; retry later", k)
		}
	}
	for _, k := range keys {
		l.held[k] = struct{}{}
	}
	return func() {
		l.mu.Lock()
		defer l.mu.Unlock()
		for _, k := range keys {
			delete(l.held, k)
		}
	}, nil
}
