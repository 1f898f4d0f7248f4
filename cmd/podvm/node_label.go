package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"

	"github.com/podvm/podvm/deploy"
)

// serviceAccountDir holds the pod's API credentials (in-cluster).
const serviceAccountDir = "/var/run/secrets/kubernetes.io/serviceaccount"

// labelNode sets (on) or removes the node label podvm.io/runtime=true with a JSON merge
// patch, as the pod's service account (it needs patch on nodes).
func labelNode(ctx context.Context, node string, on bool) error {
	host, port := os.Getenv("KUBERNETES_SERVICE_HOST"), os.Getenv("KUBERNETES_SERVICE_PORT")
	if host == "" || port == "" {
		return fmt.Errorf("not in a Kubernetes pod (no KUBERNETES_SERVICE_HOST): run without --node-name, and label node %s by hand", node)
	}
	token, err := os.ReadFile(serviceAccountDir + "/token")
	if err != nil {
		return err
	}
	ca, err := os.ReadFile(serviceAccountDir + "/ca.crt")
	if err != nil {
		return err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(ca) {
		return fmt.Errorf("%s/ca.crt: no certificate", serviceAccountDir)
	}
	var value any = "true"
	if !on {
		value = nil // a merge patch removes a key set to null
	}
	body, err := json.Marshal(map[string]any{"metadata": map[string]any{"labels": map[string]any{deploy.NodeLabel: value}}})
	if err != nil {
		return err
	}
	u := "https://" + net.JoinHostPort(host, port) + "/api/v1/nodes/" + url.PathEscape(node)
	req, err := http.NewRequestWithContext(ctx, http.MethodPatch, u, bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/merge-patch+json")
	req.Header.Set("Authorization", "Bearer "+strings.TrimSpace(string(token)))
	client := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}}}
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	defer func() { _ = resp.Body.Close() }()
	if resp.StatusCode != http.StatusOK {
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 1024))
		return fmt.Errorf("PATCH node %s: %s: %s", node, resp.Status, msg)
	}
	return nil
}
