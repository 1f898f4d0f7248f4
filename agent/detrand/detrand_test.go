package detrand

import (
	"bytes"
	"go/ast"
	"go/parser"
	"go/printer"
	"go/token"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// exported lists the exported functions of a Go file, each as its signature.
func exported(t *testing.T, file string) []string {
	t.Helper()
	fset := token.NewFileSet()
	f, err := parser.ParseFile(fset, file, nil, 0)
	if err != nil {
		t.Fatal(err)
	}
	var sigs []string
	for _, d := range f.Decls {
		fn, ok := d.(*ast.FuncDecl)
		if !ok || fn.Recv != nil || !fn.Name.IsExported() {
			continue
		}
		var b bytes.Buffer
		if err := printer.Fprint(&b, fset, fn.Type); err != nil {
			t.Fatal(err)
		}
		sigs = append(sigs, fn.Name.Name+" "+b.String())
	}
	slices.Sort(sigs)
	return sigs
}

// The agent is built with this file in place of protobuf's internal/detrand (the version
// go.mod names): it must offer what that package offers, or protobuf's other packages stop
// compiling in the agent's build only.
func TestSameFunctionsAsProtobufs(t *testing.T) {
	out, err := exec.Command("go", "list", "-f", "{{.Dir}}", "google.golang.org/protobuf/internal/detrand").Output()
	if err != nil {
		t.Fatalf("go list protobuf's detrand: %v", err)
	}
	theirs := exported(t, filepath.Join(strings.TrimSpace(string(out)), "rand.go"))
	ours := exported(t, "detrand.go")
	if !slices.Equal(ours, theirs) {
		t.Errorf("agent/detrand offers %q, protobuf's detrand %q: make them match (hack/agent-modfile.sh)", ours, theirs)
	}
}

func TestSeedFromBuildInfo(t *testing.T) {
	if s := randSeed(); s == 0 || s != buildHash() {
		t.Fatalf("seed %#x, build hash %#x: want the same, not zero (a test binary has build info)", s, buildHash())
	}
	for n := 1; n < 50; n++ {
		if v := Intn(n); v < 0 || v >= n || v != Intn(n) {
			t.Fatalf("Intn(%d) = %d, then %d: want the same value in [0, %d)", n, v, Intn(n), n)
		}
	}
	func() {
		defer func() {
			if recover() == nil {
				t.Error("Intn(0) did not panic")
			}
		}()
		Intn(0)
	}()
	Disable()
	defer func() { disabled = false }()
	if Bool() || Intn(7) != 0 {
		t.Errorf("after Disable: Bool() %v, Intn(7) %d; want false, 0", Bool(), Intn(7))
	}
}
