// Package refdoc generates podvm's reference pages from the code's own definitions:
// docs/reference/config.md from the node config's struct (its TOML keys, Go types, defaults
// and field doc comments in shim/config) and docs/reference/annotations.md from
// config.KnownAnnotations. Its test fails when the committed pages drift from the code;
// `go generate ./internal/refdoc` rewrites them.
package refdoc

//go:generate go run ./gen

import (
	"bytes"
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"path/filepath"
	"reflect"
	"sort"
	"strings"

	"github.com/podvm/podvm/shim/config"
)

// Pages are the generated files, relative to the repository root.
const (
	ConfigPage      = "docs/reference/config.md"
	AnnotationsPage = "docs/reference/annotations.md"
)

// hostDependent are defaults Default computes from the host: the page says how.
var hostDependent = map[string]string{
	"sandbox.default_vcpus": "2, or max_vcpus if that is lower",
	"sandbox.max_vcpus":     "the host's CPU count, at most 255",
}

// Generate returns every page, by path relative to repoRoot, whose Go sources it reads for
// the doc comments.
func Generate(repoRoot string) (map[string][]byte, error) {
	docs, err := fieldDocs(filepath.Join(repoRoot, "shim", "config"))
	if err != nil {
		return nil, err
	}
	cfg, err := configPage(docs)
	if err != nil {
		return nil, err
	}
	return map[string][]byte{ConfigPage: cfg, AnnotationsPage: annotationsPage()}, nil
}

// typeDocs are one struct type's doc comment and its fields' doc comments by field name.
type typeDocs struct {
	doc    string
	fields map[string]string
}

// fieldDocs parses the non-test Go files of dir and returns the doc comments of its struct
// types and their fields, by type name.
func fieldDocs(dir string) (map[string]typeDocs, error) {
	fset := token.NewFileSet()
	matches, err := filepath.Glob(filepath.Join(dir, "*.go"))
	if err != nil {
		return nil, err
	}
	out := map[string]typeDocs{}
	for _, m := range matches {
		if strings.HasSuffix(m, "_test.go") {
			continue
		}
		f, err := parser.ParseFile(fset, m, nil, parser.ParseComments)
		if err != nil {
			return nil, fmt.Errorf("refdoc: %w", err)
		}
		for _, d := range f.Decls {
			gd, ok := d.(*ast.GenDecl)
			if !ok || gd.Tok != token.TYPE {
				continue
			}
			for _, s := range gd.Specs {
				ts := s.(*ast.TypeSpec)
				st, ok := ts.Type.(*ast.StructType)
				if !ok {
					continue
				}
				td := typeDocs{doc: gd.Doc.Text(), fields: map[string]string{}}
				for _, fld := range st.Fields.List {
					for _, n := range fld.Names {
						td.fields[n.Name] = fld.Doc.Text()
					}
				}
				out[ts.Name.Name] = td
			}
		}
	}
	return out, nil
}

// configPage renders the node config reference: one section per TOML table, one entry per
// key, from config.Config's fields and config.Default's values.
func configPage(docs map[string]typeDocs) ([]byte, error) {
	var b bytes.Buffer
	b.WriteString(header("the node config's struct, field doc comments and defaults (shim/config)"))
	b.WriteString("# Node config reference\n\n" +
		"`/etc/podvm/config.toml` (containerd's runtime option `ConfigPath`, else `$PODVM_CONFIG`, else that\n" +
		"path) is read whenever a pod's VM is created. Every key is optional: a key left out keeps its\n" +
		"default, and an unknown key or a bad value is an error naming the file, the key and a good\n" +
		"value. `podvm config` prints the effective config; `deploy/config.toml` is the commented file\n" +
		"`make install` and the package install.\n\n" +
		"Sizes are Kubernetes quantities (`\"512Mi\"`, `\"1Gi\"`, `\"1G\"`) or a whole number of bytes;\n" +
		"durations are like `\"60s\"` or `\"2m\"`.\n")
	def := reflect.ValueOf(config.Default()).Elem()
	ct := def.Type()
	for i := range ct.NumField() {
		sf := ct.Field(i)
		table := tomlKey(sf)
		if table == "" {
			continue
		}
		td, ok := docs[sf.Type.Name()]
		if !ok {
			return nil, fmt.Errorf("refdoc: no doc comments found for config.%s", sf.Type.Name())
		}
		fmt.Fprintf(&b, "\n## [%s]\n\n%s", table, sentenceAfterName(td.doc))
		if err := tableEntries(&b, table, def.Field(i), td); err != nil {
			return nil, err
		}
	}
	return b.Bytes(), nil
}

// tableEntries renders the keys of one TOML table.
func tableEntries(b *bytes.Buffer, table string, v reflect.Value, td typeDocs) error {
	t := v.Type()
	for i := range t.NumField() {
		sf := t.Field(i)
		key := tomlKey(sf)
		if key == "" {
			continue
		}
		doc := td.fields[sf.Name]
		if doc == "" {
			return fmt.Errorf("refdoc: config field %s.%s (%s.%s) has no doc comment: write one for the admin", t.Name(), sf.Name, table, key)
		}
		full := table + "." + key
		dflt, ok := hostDependent[full]
		if !ok {
			dflt = "`" + tomlValue(v.Field(i).Interface()) + "`"
		}
		fmt.Fprintf(b, "\n### `%s`\n\n%s, default %s.\n\n%s", full, typeName(sf.Type), dflt, sentenceAfterName(doc))
	}
	return nil
}

func tomlKey(sf reflect.StructField) string {
	k, _, _ := strings.Cut(sf.Tag.Get("toml"), ",")
	if k == "-" {
		return ""
	}
	return k
}

// sentenceAfterName drops the Go identifier that starts a doc comment ("Accel is the
// accelerator" becomes "The accelerator"), so the page reads for an admin, and joins lines.
func sentenceAfterName(doc string) string {
	first, rest, _ := strings.Cut(doc, " ")
	if verb, tail, ok := strings.Cut(rest, " "); ok && first != "" && first[0] >= 'A' && first[0] <= 'Z' && (verb == "is" || verb == "are") {
		rest = strings.ToUpper(tail[:1]) + tail[1:]
	} else {
		rest = doc
	}
	paras := strings.Split(strings.TrimSpace(rest), "\n\n")
	var keep []string
	for _, p := range paras {
		if strings.Contains(p, "go generate") { // a note for Go developers, not the admin
			continue
		}
		keep = append(keep, escape(strings.Join(strings.Fields(p), " ")))
	}
	return strings.Join(keep, "\n\n") + "\n"
}

// escape keeps Markdown from taking placeholders such as <state_dir> for HTML tags.
func escape(s string) string { return strings.ReplaceAll(s, "<", `\<`) }

func typeName(t reflect.Type) string {
	switch t {
	case reflect.TypeFor[config.Bytes]():
		return "Size"
	case reflect.TypeFor[config.Duration]():
		return "Duration"
	}
	switch t.Kind() {
	case reflect.String:
		return "String"
	case reflect.Bool:
		return "Boolean"
	case reflect.Int, reflect.Int64:
		return "Integer"
	case reflect.Slice:
		return "Array of " + strings.ToLower(typeName(t.Elem())) + "s"
	}
	return t.String()
}

// tomlValue formats a default as it is written in the file.
func tomlValue(v any) string {
	switch v := v.(type) {
	case string:
		return fmt.Sprintf("%q", v)
	case config.Bytes:
		return fmt.Sprintf("%q", v.String())
	case config.Duration:
		return fmt.Sprintf("%q", v.String())
	case []string:
		q := make([]string, len(v))
		for i, s := range v {
			q[i] = fmt.Sprintf("%q", s)
		}
		return "[" + strings.Join(q, ", ") + "]"
	}
	return fmt.Sprint(v)
}

// annotationsPage renders the annotation reference from config.KnownAnnotations.
func annotationsPage() []byte {
	var b bytes.Buffer
	b.WriteString(header("config.KnownAnnotations (shim/config/annotation_table.go)"))
	b.WriteString("# Pod annotation reference\n\n" +
		"Pods set `podvm.io/<key>` annotations; containerd passes them to the shim (the drop-in's\n" +
		"`pod_annotations = [\"podvm.io/*\"]`), and the shim honours **only those the node config\n" +
		"allows** in `[annotations] allowed` (see [config.md](config.md#annotationsallowed)); a set but\n" +
		"not allowed one is ignored with a warning in the shim's log. A bad value fails the pod with\n" +
		"an error naming the annotation.\n\n" +
		"| annotation | allow with | value | example |\n| --- | --- | --- | --- |\n")
	anns := config.KnownAnnotations()
	for _, a := range anns {
		fmt.Fprintf(&b, "| `%s` | `%q` | %s | `%q` |\n", a.Key, a.Allow, escape(a.Value), a.Example)
	}
	for _, a := range anns {
		fmt.Fprintf(&b, "\n## `%s`\n\n%s\n\n```yaml\nmetadata:\n  annotations:\n    %s: %q\n```\n", a.Key, escape(a.Doc), exampleKey(a.Key), a.Example)
	}
	keys := []string{config.CRISandboxCPUQuota, config.CRISandboxCPUPeriod, config.CRISandboxMemory}
	sort.Strings(keys)
	b.WriteString("\n## Set by containerd\n\nThe shim also reads these sandbox annotations, which containerd's CRI sets from the sum of\nthe pod's container limits (pods do not set them):\n\n")
	for _, k := range keys {
		fmt.Fprintf(&b, "- `%s`\n", k)
	}
	return b.Bytes()
}

// exampleKey fills a family's placeholder for the YAML example.
func exampleKey(key string) string {
	return strings.NewReplacer("<volume>", "data").Replace(key)
}

func header(from string) string {
	return "<!-- Generated from " + from + " by `go generate ./internal/refdoc`. Do not edit: edit the code. -->\n\n"
}
