// Package kubernetes_test checks install/kubernetes: the kustomization builds, every
// object decodes strictly with client-go's scheme, and the pieces are wired to each other
// and to the binaries (flags, metrics, API calls).
package kubernetes_test

import (
	"fmt"
	"path/filepath"
	"runtime"
	"testing"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	k8sruntime "k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"k8s.io/client-go/kubernetes/scheme"
	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/kyaml/filesys"
	"sigs.k8s.io/yaml"
)

// dir is install/kubernetes, wherever the test runs from.
func dir() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Dir(file)
}

// repoRoot is the module's root.
func repoRoot() string { return filepath.Join(dir(), "..", "..") }

// built is what `kustomize build install/kubernetes` makes, decoded: typed objects from
// client-go's scheme by kind/name, and the objects of kinds outside it (the
// ServiceMonitor, the PodMonitor) as unstructured.
type built struct {
	typed   map[string]k8sruntime.Object
	untyped map[string]*unstructured.Unstructured
}

// key names an object: Kind/namespace/name (namespace empty for cluster objects).
func key(kind, namespace, name string) string { return kind + "/" + namespace + "/" + name }

// strictDecoder refuses unknown and duplicate fields.
var strictDecoder = serializer.NewCodecFactory(scheme.Scheme, serializer.EnableStrict).UniversalDeserializer()

// build runs kustomize (the krusty library, as the kustomize CLI does) on path and decodes
// every object it makes strictly.
func build(t *testing.T, path string) *built {
	t.Helper()
	objs, err := buildYAML(path)
	if err != nil {
		t.Fatal(err)
	}
	b := &built{typed: map[string]k8sruntime.Object{}, untyped: map[string]*unstructured.Unstructured{}}
	for _, y := range objs {
		u := &unstructured.Unstructured{}
		if _, _, err := unstructured.UnstructuredJSONScheme.Decode(mustJSON(t, y), nil, u); err != nil {
			t.Fatalf("not a Kubernetes object: %v\n%s", err, y)
		}
		k := key(u.GetKind(), u.GetNamespace(), u.GetName())
		if !scheme.Scheme.Recognizes(u.GroupVersionKind()) {
			b.untyped[k] = u
			continue
		}
		obj, _, err := strictDecoder.Decode(y, nil, nil)
		if err != nil {
			t.Fatalf("%s does not decode strictly with client-go's scheme: %v", k, err)
		}
		b.typed[k] = obj
	}
	return b
}

// buildYAML returns each object kustomize builds from path as YAML.
func buildYAML(path string) ([][]byte, error) {
	k := krusty.MakeKustomizer(krusty.MakeDefaultOptions())
	res, err := k.Run(filesys.MakeFsOnDisk(), path)
	if err != nil {
		return nil, fmt.Errorf("kustomize build %s: %w", path, err)
	}
	var out [][]byte
	for _, r := range res.Resources() {
		y, err := r.AsYAML()
		if err != nil {
			return nil, fmt.Errorf("kustomize build %s: %s: %w", path, r.CurId(), err)
		}
		out = append(out, y)
	}
	return out, nil
}

// get returns the typed object kind/namespace/name, failing the test when it is missing.
func get[T k8sruntime.Object](t *testing.T, b *built, kind, namespace, name string) T {
	t.Helper()
	obj, ok := b.typed[key(kind, namespace, name)]
	if !ok {
		t.Fatalf("kustomize build made no %s %s/%s; it made %v", kind, namespace, name, b.keys())
	}
	typed, ok := obj.(T)
	if !ok {
		t.Fatalf("%s %s/%s decoded as %T", kind, namespace, name, obj)
	}
	return typed
}

func (b *built) keys() []string {
	var ks []string
	for k := range b.typed {
		ks = append(ks, k)
	}
	for k := range b.untyped {
		ks = append(ks, k)
	}
	return ks
}

func mustJSON(t *testing.T, y []byte) []byte {
	t.Helper()
	j, err := yaml.YAMLToJSON(y)
	if err != nil {
		t.Fatal(err)
	}
	return j
}
