package content

import (
	"context"
	"path/filepath"
	"testing"

	"github.com/containerd/plugin"
)

// initAll initializes regs the way plugin/node does and returns the set.
func initAll(t *testing.T, cfg Config, disabled ...string) *plugin.Set {
	t.Helper()
	var reg plugin.Registry
	for _, r := range Registrations(func(*plugin.InitContext) Config { return cfg }) {
		reg = reg.Register(r)
	}
	off := map[string]bool{}
	for _, d := range disabled {
		off[d] = true
	}
	set := plugin.NewPluginSet()
	for _, r := range reg.Graph(func(r *plugin.Registration) bool { return off[r.URI()] }) {
		ic := plugin.NewContext(context.Background(), set, nil)
		p := r.Init(ic)
		if err := set.Add(p); err != nil {
			t.Fatal(err)
		}
		if err := p.Err(); err != nil && !plugin.IsSkipPlugin(err) {
			t.Fatalf("%s: %v", r.URI(), err)
		}
	}
	return set
}

func instance(set *plugin.Set, typ plugin.Type, id string) (any, error) {
	p := set.Get(typ, id)
	if p == nil {
		return nil, plugin.ErrPluginNotFound
	}
	return p.Instance()
}

func TestRegistrations(t *testing.T) {
	t.Parallel()
	// Not configured: every part skips.
	set := initAll(t, Config{})
	for _, p := range []struct {
		typ plugin.Type
		id  string
	}{{TypeContent, "local"}, {TypeDiff, "apply"}, {TypeGRPC, "content"}} {
		if _, err := instance(set, p.typ, p.id); !plugin.IsSkipPlugin(err) {
			t.Errorf("%s.%s without a root: %v, want skipped", p.typ, p.id, err)
		}
	}

	// Configured: the server serves both APIs on the socket.
	cfg := Config{Root: filepath.Join(t.TempDir(), "content"), Socket: filepath.Join(shortDir(t), "c.sock"), Logger: testLogger(t)}
	set = initAll(t, cfg)
	inst, err := instance(set, TypeGRPC, "content")
	if err != nil {
		t.Fatal(err)
	}
	svc := inst.(*Service)
	defer svc.Close()
	if svc.Differ() == nil || svc.Addr() != cfg.Socket || svc.Store().Root() != cfg.Root {
		t.Fatalf("service %+v", svc)
	}
	svc.Close()

	// Differ disabled: content only.
	cfg.Socket = filepath.Join(shortDir(t), "c.sock")
	set = initAll(t, cfg, string(TypeDiff)+".apply")
	inst, err = instance(set, TypeGRPC, "content")
	if err != nil {
		t.Fatal(err)
	}
	svc = inst.(*Service)
	defer svc.Close()
	if svc.Differ() != nil {
		t.Fatal("differ served although disabled")
	}
}
