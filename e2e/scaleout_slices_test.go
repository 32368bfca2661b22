package e2e

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/rest"

	"github.com/cove-oci/cove/internal/peers"
)

// A cove-cache replica started with --peers-from-endpointslices follows its Service's
// ready EndpointSlices on a real kube-apiserver, read with a ServiceAccount granted only
// get/list/watch on endpointslices: members appear, join, and leave (an endpoint not
// ready, a slice deleted), as cove_peer_members shows. A replica whose ServiceAccount
// lacks the grant says so in its log and still serves pulls, alone.
//
// The replicas here listen on 127.0.0.1, which the API refuses as an endpoint address
// (and "localhost" as an FQDN one): the slices name addresses no replica is at, so this
// test checks the membership a replica sees, not forwarding. Forwarding over a
// membership is TestScaleOut* with --peer: the ring reads the same Membership interface.
func TestScaleOutEndpointSlices(t *testing.T) {
	kube := peers.StartKubeAPIServer(t)
	const ns, svc = "cove", "cove-cache"
	kube.EnsureNamespace(t, ns)
	granted := kube.ServiceAccountConfig(t, ns, "cove-cache")
	kube.GrantRole(t, ns, "cove-cache", "cove-cache-peers", rbacv1.PolicyRule{
		APIGroups: []string{"discovery.k8s.io"}, Resources: []string{"endpointslices"}, Verbs: []string{"get", "list", "watch"},
	})
	ungranted := kube.ServiceAccountConfig(t, ns, "intruder")

	origin := peers.StartRegistry(t)
	img := peers.PushRandomImage(t, origin.Addr, "team/a:v1", 1, 1<<20)
	m := peers.StartMinIO(t)
	m.SetEnv(t)
	start := func(cfg *rest.Config) *peers.Cove {
		kubeconfig := kube.WriteKubeconfig(t, cfg)
		cr := peers.StartCoveReplicasWith(t, 1, func([]string) []string {
			return []string{"--peers-from-endpointslices", ns + "/" + svc, "--kubeconfig", kubeconfig}
		}, "--origin-plain-http", origin.Addr, "--s3-endpoint", m.Endpoint, "--s3-bucket", m.Bucket)
		return cr.Replicas[0]
	}
	replica := start(granted)

	admin := kube.AdminClient(t).DiscoveryV1().EndpointSlices(ns)
	ctx := context.Background()
	publish := func(i int, ready bool) {
		t.Helper()
		slice := &discoveryv1.EndpointSlice{
			ObjectMeta: metav1.ObjectMeta{
				Name:   fmt.Sprintf("%s-%d", svc, i),
				Labels: map[string]string{discoveryv1.LabelServiceName: svc},
			},
			AddressType: discoveryv1.AddressTypeIPv4,
			Endpoints: []discoveryv1.Endpoint{{
				Addresses:  []string{fmt.Sprintf("10.0.7.%d", i+1)},
				Conditions: discoveryv1.EndpointConditions{Ready: &ready},
			}},
			Ports: []discoveryv1.EndpointPort{{Name: ptr("http"), Port: ptr(int32(5005)), Protocol: ptr(corev1.ProtocolTCP)}},
		}
		if _, err := admin.Get(ctx, slice.Name, metav1.GetOptions{}); err == nil {
			if _, err := admin.Update(ctx, slice, metav1.UpdateOptions{}); err != nil {
				t.Fatal(err)
			}
			return
		}
		if _, err := admin.Create(ctx, slice, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	waitMembers := func(c *peers.Cove, want int) {
		t.Helper()
		for deadline := time.Now().Add(30 * time.Second); c.Metric(t, "cove_peer_members") != float64(want); {
			if time.Now().After(deadline) {
				t.Fatalf("replica sees %v members, want %d", c.Metric(t, "cove_peer_members"), want)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}

	publish(0, true)
	publish(1, true)
	waitMembers(replica, 2)
	publish(2, true) // joins
	waitMembers(replica, 3)
	publish(1, false) // leaves: not ready
	waitMembers(replica, 2)
	if err := admin.Delete(ctx, svc+"-0", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitMembers(replica, 1)

	// Without the grant: refused, said in the log, and pulls are still served.
	intruder := start(ungranted)
	for deadline := time.Now().Add(30 * time.Second); !logged(t, intruder, "membership stopped"); {
		if time.Now().After(deadline) {
			t.Fatal("a replica refused the EndpointSlices did not log it")
		}
		time.Sleep(50 * time.Millisecond)
	}
	if n := intruder.Metric(t, "cove_peer_members"); n != 0 {
		t.Fatalf("a replica refused the EndpointSlices sees %v members", n)
	}
	u := intruder.URL + "/v2/team/a/blobs/" + img.Layers[0] + "?ns=" + url.QueryEscape(origin.Addr)
	if err := getBlobChecked(u, img.Layers[0]); err != nil {
		t.Fatalf("a replica without members did not serve a pull: %v", err)
	}
}

// logged reports whether a cove-cache's log has a line whose message contains msg.
func logged(t *testing.T, c *peers.Cove, msg string) bool {
	for _, l := range c.Logs(t) {
		if m, _ := l["msg"].(string); strings.Contains(m, msg) {
			return true
		}
	}
	return false
}

func ptr[T any](v T) *T { return &v }

// getBlobChecked GETs u and checks the body against digest d.
func getBlobChecked(u, d string) error {
	resp, err := http.Get(u)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("status %d", resp.StatusCode)
	}
	h := sha256.New()
	if _, err := io.Copy(h, resp.Body); err != nil {
		return err
	}
	if got := "sha256:" + hex.EncodeToString(h.Sum(nil)); got != d {
		return fmt.Errorf("body digest %s", got)
	}
	return nil
}
