package kubernetes_test

import (
	"go/ast"
	"go/parser"
	"go/token"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	rbacv1 "k8s.io/api/rbac/v1"
)

// apiCall is one Kubernetes API use found in cove's code.
type apiCall struct {
	group, resource string
	verbs           []string // empty when the code does not show them (a client kept in a variable)
	at              string   // file:line
}

// groupOf maps client-go's group accessors (CoreV1, Discovery().V1()) to API groups.
var groupOf = map[string]string{
	"Core": "", "Discovery": "discovery.k8s.io", "Coordination": "coordination.k8s.io",
	"Apps": "apps", "Rbac": "rbac.authorization.k8s.io", "Events": "events.k8s.io", "Policy": "policy",
}

var (
	typedGroup   = regexp.MustCompile(`^([A-Z][a-z]+)V[0-9]+((alpha|beta)[0-9]+)?$`) // cs.DiscoveryV1()
	informerVers = regexp.MustCompile(`^V[0-9]+((alpha|beta)[0-9]+)?$`)              // f.Discovery().V1()
	verbs        = map[string]string{"Get": "get", "List": "list", "Watch": "watch", "Create": "create", "Update": "update",
		"UpdateStatus": "update", "Patch": "patch", "Apply": "patch", "Delete": "delete", "DeleteCollection": "deletecollection"}
)

// scanAPICalls finds the typed clientset and informer calls in one Go source.
func scanAPICalls(t *testing.T, fset *token.FileSet, name string, src []byte) []apiCall {
	t.Helper()
	f, err := parser.ParseFile(fset, name, src, 0)
	if err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	var calls []apiCall
	imports := map[string]string{} // package name in this file -> import path
	for _, im := range f.Imports {
		path := strings.Trim(im.Path.Value, `"`)
		name := filepath.Base(path)
		if im.Name != nil {
			name = im.Name.Name
		}
		imports[name] = path
	}
	var stack []ast.Node
	ast.Inspect(f, func(n ast.Node) bool {
		if n == nil {
			stack = stack[:len(stack)-1]
			return true
		}
		stack = append(stack, n)
		sel, ok := n.(*ast.SelectorExpr)
		if !ok {
			return true
		}
		if c, ok := informerConstructor(sel, imports); ok {
			c.at = fset.Position(sel.Pos()).String()
			calls = append(calls, c)
			return true
		}
		group, informer := "", false
		if m := typedGroup.FindStringSubmatch(sel.Sel.Name); m != nil {
			group = m[1]
		} else if informerVers.MatchString(sel.Sel.Name) {
			inner, ok := sel.X.(*ast.CallExpr)
			if !ok {
				return true
			}
			gsel, ok := inner.Fun.(*ast.SelectorExpr)
			if !ok {
				return true
			}
			group, informer = gsel.Sel.Name, true
		} else {
			return true
		}
		// stack: ... resourceSel? <- call(group) <- sel. Walk up: call, then the resource selector.
		chain := selectorChain(stack)
		if len(chain) < 1 {
			return true
		}
		apiGroup, known := groupOf[group]
		call := apiCall{resource: strings.ToLower(chain[0]), at: fset.Position(sel.Pos()).String()}
		if !known {
			call.group = "?" + group
		} else {
			call.group = apiGroup
		}
		switch {
		case chain[0] == "RESTClient":
			return true // a raw REST client: not followed here (none in cove today)
		case informer:
			call.verbs = []string{"list", "watch"}
		case len(chain) > 1 && verbs[chain[1]] != "":
			call.verbs = []string{verbs[chain[1]]}
		}
		calls = append(calls, call)
		return true
	})
	return calls
}

// informerConstructor recognises client-go's informers/<group>/<version>.New[Filtered]<Kind>Informer,
// which lists and watches the kind.
func informerConstructor(sel *ast.SelectorExpr, imports map[string]string) (apiCall, bool) {
	pkg, ok := sel.X.(*ast.Ident)
	if !ok {
		return apiCall{}, false
	}
	m := informerPath.FindStringSubmatch(imports[pkg.Name])
	k := informerFunc.FindStringSubmatch(sel.Sel.Name)
	if m == nil || k == nil {
		return apiCall{}, false
	}
	group, known := groupOf[strings.ToUpper(m[1][:1])+m[1][1:]]
	if !known {
		group = "?" + m[1]
	}
	resource := strings.ToLower(k[2])
	if !strings.HasSuffix(resource, "s") {
		resource += "s"
	}
	return apiCall{group: group, resource: resource, verbs: []string{"list", "watch"}}, true
}

var (
	informerPath = regexp.MustCompile(`^k8s\.io/client-go/informers/([a-z]+)/v[0-9a-z]+$`)
	informerFunc = regexp.MustCompile(`^New(Filtered)?([A-Z][A-Za-z]+)Informer$`)
)

// selectorChain returns the method names called on the result of the selector at the
// top of stack: for cs.DiscoveryV1().EndpointSlices(ns).List(...), ["EndpointSlices", "List"].
func selectorChain(stack []ast.Node) []string {
	var names []string
	for i := len(stack) - 2; i >= 1; i -= 2 {
		call, ok := stack[i].(*ast.CallExpr)
		if !ok || call.Fun != stack[i+1] {
			break
		}
		sel, ok := stack[i-1].(*ast.SelectorExpr)
		if !ok || sel.X != call {
			break
		}
		names = append(names, sel.Sel.Name)
	}
	return names
}

// codeAPICalls scans the Go files of every package of this module that the binary pkg
// (./cmd/cove-cache, ./cmd/cove-node) is built from (test helpers such as internal/peers,
// which set up a test's API server, are not).
func codeAPICalls(t *testing.T, pkg string) []apiCall {
	t.Helper()
	cmd := exec.Command("go", "list", "-deps", "-f",
		`{{with .Module}}{{if eq .Path "github.com/cove-oci/cove"}}{{$.Dir}}{{range $.GoFiles}} {{.}}{{end}}{{"\n"}}{{end}}{{end}}`,
		pkg)
	cmd.Dir = repoRoot()
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	fset := token.NewFileSet()
	var calls []apiCall
	packages := 0
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		fields := strings.Fields(line)
		if len(fields) == 0 {
			continue
		}
		packages++
		for _, name := range fields[1:] {
			path := filepath.Join(fields[0], name)
			src, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			rel, _ := filepath.Rel(repoRoot(), path)
			calls = append(calls, scanAPICalls(t, fset, rel, src)...)
		}
	}
	if packages < 10 {
		t.Fatalf("go list found %d of cove's packages in %s: %s", packages, pkg, out)
	}
	return calls
}

// allows reports whether rules grant verb on group/resource.
func allows(rules []rbacv1.PolicyRule, group, resource, verb string) bool {
	for _, r := range rules {
		if len(r.ResourceNames) == 0 && slices.Contains(r.APIGroups, group) && slices.Contains(r.Resources, resource) && slices.Contains(r.Verbs, verb) {
			return true
		}
	}
	return false
}

// TestManifestRBACLeastPrivilege: each binary has one Role, exactly get, list and watch
// on EndpointSlices, bound to the ServiceAccount its workload runs as (cove-cache reads
// its peers, cove-node the replicas it sends blobs to); no cluster-wide role is made;
// and every API call in the code each binary is built from is covered by its Role.
func TestManifestRBACLeastPrivilege(t *testing.T) {
	b := build(t, dir())
	for k := range b.typed {
		if strings.HasPrefix(k, "ClusterRole") {
			t.Errorf("%s: cove needs no cluster-wide permission", k)
		}
	}
	var roles []string
	for k := range b.typed {
		if strings.HasPrefix(k, "Role/") {
			roles = append(roles, k)
		}
	}
	slices.Sort(roles)
	if want := []string{key("Role", namespace, "cove-cache-peers"), key("Role", namespace, "cove-node-caches")}; !slices.Equal(roles, want) {
		t.Fatalf("Roles %v, want %v", roles, want)
	}
	want := rbacv1.PolicyRule{APIGroups: []string{"discovery.k8s.io"}, Resources: []string{"endpointslices"}, Verbs: []string{"get", "list", "watch"}}
	for _, bin := range []struct {
		pkg, role, serviceAccount string
	}{
		{"./cmd/cove-cache", "cove-cache-peers", get[*appsv1.Deployment](t, b, "Deployment", namespace, cacheName).Spec.Template.Spec.ServiceAccountName},
		{"./cmd/cove-node", "cove-node-caches", get[*appsv1.DaemonSet](t, b, "DaemonSet", namespace, nodeName).Spec.Template.Spec.ServiceAccountName},
	} {
		role := get[*rbacv1.Role](t, b, "Role", namespace, bin.role)
		if len(role.Rules) != 1 || !slices.Equal(role.Rules[0].APIGroups, want.APIGroups) ||
			!slices.Equal(role.Rules[0].Resources, want.Resources) || !slices.Equal(role.Rules[0].Verbs, want.Verbs) ||
			len(role.Rules[0].ResourceNames) != 0 || len(role.Rules[0].NonResourceURLs) != 0 {
			t.Errorf("Role %s rules %+v, want exactly %+v", bin.role, role.Rules, want)
		}
		rb := get[*rbacv1.RoleBinding](t, b, "RoleBinding", namespace, bin.role)
		if rb.RoleRef.Kind != "Role" || rb.RoleRef.Name != bin.role || len(rb.Subjects) != 1 || rb.Subjects[0].Kind != "ServiceAccount" ||
			rb.Subjects[0].Name != bin.serviceAccount || rb.Subjects[0].Namespace != namespace {
			t.Errorf("RoleBinding %s: %+v to %+v, want Role %s to ServiceAccount %s/%s", bin.role, rb.RoleRef, rb.Subjects, bin.role, namespace, bin.serviceAccount)
		}
		if b.typed[key("ServiceAccount", namespace, bin.serviceAccount)] == nil {
			t.Errorf("%s runs as ServiceAccount %q, which is not built", bin.pkg, bin.serviceAccount)
		}
		calls := codeAPICalls(t, bin.pkg)
		t.Logf("Kubernetes API calls in %s's code: %+v", bin.pkg, calls)
		if len(calls) == 0 {
			t.Errorf("no Kubernetes API call found in %s's code: the scan is broken, or the Role is not needed", bin.pkg)
		}
		for _, c := range calls {
			if strings.HasPrefix(c.group, "?") {
				t.Errorf("%s: unknown API group accessor %s: add it to groupOf", c.at, c.group[1:])
				continue
			}
			vs := c.verbs
			if len(vs) == 0 {
				vs = []string{"get"} // the resource at least; its verbs are not visible here
			}
			for _, v := range vs {
				if !allows(role.Rules, c.group, c.resource, v) {
					t.Errorf("%s: %s may %s %s.%s, which its Role %s does not grant", c.at, bin.pkg, v, c.resource, c.group, bin.role)
				}
			}
		}
	}
}

// TestManifestRBACScanFindsCalls: the attack on the scan: typed and informer calls, a
// Lease update included, are all found with their verbs.
func TestManifestRBACScanFindsCalls(t *testing.T) {
	src := []byte(`package x
import discoveryinformers "k8s.io/client-go/informers/discovery/v1"
func f() {
	cs.DiscoveryV1().EndpointSlices(ns).List(ctx, opts)
	inf := factory.Discovery().V1().EndpointSlices().Informer()
	cs.CoordinationV1().Leases(ns).Update(ctx, l, o)
	c := cs.CoreV1().Services(ns)
	i := discoveryinformers.NewFilteredEndpointSliceInformer(cs, ns, 0, nil, nil)
}`)
	got := scanAPICalls(t, token.NewFileSet(), "x.go", src)
	want := []string{"discovery.k8s.io endpointslices [list]", "discovery.k8s.io endpointslices [list watch]",
		"coordination.k8s.io leases [update]", " services []", "discovery.k8s.io endpointslices [list watch]"}
	var have []string
	for _, c := range got {
		have = append(have, c.group+" "+c.resource+" "+"["+strings.Join(c.verbs, " ")+"]")
	}
	if !slices.Equal(have, want) {
		t.Fatalf("scan found %q, want %q", have, want)
	}
	rules := []rbacv1.PolicyRule{{APIGroups: []string{"discovery.k8s.io"}, Resources: []string{"endpointslices"}, Verbs: []string{"get", "list", "watch"}}}
	if allows(rules, "coordination.k8s.io", "leases", "update") || !allows(rules, "discovery.k8s.io", "endpointslices", "watch") {
		t.Fatal("allows is wrong")
	}
}
