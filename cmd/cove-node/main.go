// Command cove-node is the node agent that runs beside containerd on every node: the
// resolver hook (containerd's _default registry mirror), the content hook, and fast
// fallback to the origin. It is being built; this release has only 'version'.
package main

import (
	"fmt"
	"io"
	"os"

	"github.com/cove-oci/cove/internal/version"
)

const usage = `cove-node: the cove agent beside containerd on every node.

Usage:
  cove-node version   print the version

The resolver hook, content hook and 'serve' are not in this release; until then point
containerd's _default hosts.toml mirror at cove-cache directly (see docs/operations.md).
`

func main() { os.Exit(run(os.Args[1:], os.Stdout, os.Stderr)) }

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 1 && (args[0] == "version" || args[0] == "--version") {
		fmt.Fprintln(stdout, "cove-node", version.Version)
		return 0
	}
	if len(args) == 1 && (args[0] == "help" || args[0] == "-h" || args[0] == "--help") {
		fmt.Fprint(stdout, usage)
		return 0
	}
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	fmt.Fprintf(stderr, "cove-node: unknown command %q\n\n%s", args[0], usage)
	return 2
}
