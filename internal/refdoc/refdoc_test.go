package refdoc

import (
	"bytes"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/podvm/podvm/rootfs"
	"github.com/podvm/podvm/shim/config"
)

const repoRoot = "../.."

// TestPagesUpToDate fails when the committed reference pages differ from what the code
// generates: a config key, default, doc comment or annotation changed without the docs.
func TestPagesUpToDate(t *testing.T) {
	pages, err := Generate(repoRoot)
	if err != nil {
		t.Fatal(err)
	}
	for p, want := range pages {
		got, err := os.ReadFile(filepath.Join(repoRoot, p))
		if err != nil {
			t.Fatalf("%v; run 'go generate ./internal/refdoc'", err)
		}
		if !bytes.Equal(got, want) {
			t.Errorf("%s is out of date with the code; run 'go generate ./internal/refdoc' and commit it", p)
		}
	}
}

// TestEveryKeyDocumented: the config page has an entry for every key the file can hold.
func TestEveryKeyDocumented(t *testing.T) {
	pages, err := Generate(repoRoot)
	if err != nil {
		t.Fatal(err)
	}
	cfgTOML, err := config.Default().TOML()
	if err != nil {
		t.Fatal(err)
	}
	section := ""
	for _, line := range strings.Split(string(cfgTOML), "\n") {
		line = strings.TrimSpace(line)
		switch {
		case strings.HasPrefix(line, "["):
			section = strings.Trim(line, "[]")
		case strings.Contains(line, " = "):
			key := section + "." + strings.Fields(line)[0]
			if !bytes.Contains(pages[ConfigPage], []byte("### `"+key+"`")) {
				t.Errorf("%s has no entry for %s", ConfigPage, key)
			}
		}
	}
}

// TestMissingDocCommentFails: a config field without a doc comment stops the generator.
func TestMissingDocCommentFails(t *testing.T) {
	docs, err := fieldDocs(filepath.Join(repoRoot, "shim", "config"))
	if err != nil {
		t.Fatal(err)
	}
	docs["Block"].fields["AIO"] = ""
	if _, err := configPage(docs); err == nil || !strings.Contains(err.Error(), "block.aio") {
		t.Fatalf("configPage without a doc for block.aio: %v, want an error naming it", err)
	}
}

// TestDiskAnnotationFamily: the annotation table and the code that reads disk annotations
// agree on the key.
func TestDiskAnnotationFamily(t *testing.T) {
	if config.AnnotationDisk != rootfs.DiskAnnotationPrefix {
		t.Fatalf("config.AnnotationDisk %q, rootfs reads %q", config.AnnotationDisk, rootfs.DiskAnnotationPrefix)
	}
}

var (
	headingRe     = regexp.MustCompile("(?m)^### `(.+)`$")
	placeholderRe = regexp.MustCompile(`<[^>]*>|…`)
)

// TestTroubleshootingMessagesExist: every message docs/troubleshooting.md is keyed by is still
// emitted by the code: each literal stretch of it (between <placeholders>) is in a Go source.
func TestTroubleshootingMessagesExist(t *testing.T) {
	page, err := os.ReadFile(filepath.Join(repoRoot, "docs", "troubleshooting.md"))
	if err != nil {
		t.Fatal(err)
	}
	src := goSources(t)
	headings := headingRe.FindAllStringSubmatch(string(page), -1)
	if len(headings) < 10 {
		t.Fatalf("docs/troubleshooting.md: %d message headings, want the page's entries", len(headings))
	}
	for _, h := range headings {
		for _, frag := range placeholderRe.Split(h[1], -1) {
			frag = strings.Trim(frag, ` "':;,.()=`)
			if len(frag) < 6 {
				continue
			}
			if !strings.Contains(src, frag) {
				t.Errorf("troubleshooting entry %q: the code no longer says %q", h[1], frag)
			}
		}
	}
}

// goSources returns the text of every non-test Go file of the repository, with Go's \" escapes
// undone so messages read as printed.
func goSources(t *testing.T) string {
	t.Helper()
	var b strings.Builder
	err := filepath.WalkDir(repoRoot, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && (d.Name() == "_output" || d.Name() == ".git" || d.Name() == "integration") {
			return filepath.SkipDir
		}
		if d.IsDir() || !strings.HasSuffix(p, ".go") || strings.HasSuffix(p, "_test.go") {
			return nil
		}
		data, err := os.ReadFile(p)
		b.Write(data)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return strings.ReplaceAll(b.String(), `\"`, `"`)
}
