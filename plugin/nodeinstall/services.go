package nodeinstall

import (
	"context"
	"fmt"
	"os/exec"
	"strings"
	"time"
)

// systemctl runs the node's systemctl (Options.Systemctl) with args.
func (o *Options) systemctl(ctx context.Context, args ...string) error {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	argv := append(append([]string(nil), o.Systemctl[1:]...), args...)
	out, err := exec.CommandContext(ctx, o.Systemctl[0], argv...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %v: %s", strings.Join(o.Systemctl, " "), strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

func (o *Options) active(ctx context.Context, unit string) bool {
	return o.systemctl(ctx, "is-active", "--quiet", unit) == nil
}

// services starts what the install changed: the units, and containerd when its
// configuration changed. A containerd that does not come back on the new configuration
// has the install rolled back and is restarted on the old one. With NoRestart it says
// what to run instead.
func (in *installer) services(ctx context.Context) error {
	changed := in.tx.changed
	restartCtd := changed["rootconfig"] || changed["dropin"]
	if in.NoRestart {
		if in.sandboxed() {
			in.say("--no-restart: no service touched (--root-dir %s is not this machine's root)", in.RootDir)
			return nil
		}
		steps := "systemctl daemon-reload"
		if in.ContentHook {
			steps += " && systemctl enable --now " + SocketUnitName
		} else if changed["socket"] {
			steps += " && systemctl disable --now " + SocketUnitName
		}
		steps += " && systemctl enable --now " + UnitName
		if restartCtd {
			steps += " && systemctl restart containerd"
			in.say("containerd must be restarted to read its new configuration")
		}
		in.say("--no-restart: no service touched. To start: %s", steps)
		return nil
	}
	wasActive, socketActive := in.active(ctx, UnitName), in.active(ctx, SocketUnitName)
	if !in.ContentHook && changed["socket"] {
		// The content hook off: the socket unit goes (its file is already gone).
		if err := in.systemctl(ctx, "disable", "--now", SocketUnitName); err != nil {
			in.warn("%v", err)
		}
	}
	fail := func(err error) error {
		in.tx.rollback()
		in.systemctl(ctx, "daemon-reload")
		return fmt.Errorf("%v: %w", err, ErrRolledBack)
	}
	if err := in.systemctl(ctx, "daemon-reload"); err != nil {
		return fail(err)
	}
	if in.ContentHook {
		// The socket before the service: cove-node takes it over from systemd.
		if err := in.systemctl(ctx, "enable", "--now", SocketUnitName); err != nil {
			return fail(err)
		}
		if socketActive && changed["socket"] {
			if err := in.systemctl(ctx, "restart", SocketUnitName); err != nil {
				return fail(err)
			}
			in.say("restarted %s", SocketUnitName)
		}
	}
	if err := in.systemctl(ctx, "enable", "--now", UnitName); err != nil {
		return fail(err)
	}
	if wasActive && (changed["unit"] || changed["binary"] || changed["cacheca"]) {
		if err := in.systemctl(ctx, "restart", UnitName); err != nil {
			return fail(err)
		}
		in.say("restarted %s", UnitName)
	}
	if !restartCtd {
		in.say("containerd's configuration is unchanged: containerd not restarted")
		return nil
	}
	if err := in.systemctl(ctx, "restart", "containerd"); err != nil {
		if !wasActive {
			in.systemctl(ctx, "disable", "--now", UnitName)
		}
		if !socketActive && in.ContentHook {
			in.systemctl(ctx, "disable", "--now", SocketUnitName)
		}
		in.tx.rollback()
		in.systemctl(ctx, "daemon-reload")
		if rerr := in.systemctl(ctx, "restart", "containerd"); rerr != nil {
			in.warn("containerd did not start on its old configuration either: systemctl status containerd")
		}
		return fmt.Errorf("containerd did not start with the new configuration (journalctl -u containerd): %v: %w; containerd restarted on them", err, ErrRolledBack)
	}
	in.say("restarted containerd")
	return nil
}
