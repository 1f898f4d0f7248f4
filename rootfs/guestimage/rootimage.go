package guestimage

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"strconv"
	"strings"
)

// RootImageFile is the guest's root as a read-only ext4 image, for kernels that can mount it from
// virtio-pmem with DAX (see RootImageSupport). It holds the same files as the initrd.
const RootImageFile = "root.img"

// RootImageAlign is what the root image's size is a multiple of: the guest maps pmem in 2 MiB
// sections.
const RootImageAlign = 2 << 20

// RootImageLabel is the ext4 volume label of the root image.
const RootImageLabel = "podvm-root"

// rootImageBuiltins are the modules a kernel must have built in (modules.builtin) to mount its
// root from virtio-pmem before any module can be loaded: the virtio-pmem driver, the libnvdimm
// pmem block driver that exposes /dev/pmem0, and ext4.
var rootImageBuiltins = []string{"virtio_pmem", "nd_pmem", "ext4"}

// rootImageConfig is the kernel option DAX mounts need; the kernel config must set it to y.
const rootImageConfig = "CONFIG_FS_DAX"

const (
	ext4Block = 4096 // DAX needs the block size to equal the page size
	ext4Inode = 256
	// rootImageTime is every timestamp in the image. Not 0: e2fsprogs reads a fake time of 0 as
	// "use the clock".
	rootImageTime = 1
)

// rootImageMke2fsConf pins the features to what the guest kernel (6.1) mounts, whatever the
// host's /etc/mke2fs.conf enables; no journal and no resize inode as the image is read-only.
const rootImageMke2fsConf = `[defaults]
	base_features = sparse_super,large_file,filetype,dir_index,ext_attr
	blocksize = 4096
	inode_size = 256
	inode_ratio = 16384

[fs_types]
	ext4 = {
		features = extent,huge_file,flex_bg,metadata_csum,64bit,dir_nlink,extra_isize
	}
`

// e2fsprogsDirs are searched for mke2fs and debugfs when they are not in PATH (Debian installs
// them in /usr/sbin, which a user's PATH may lack).
var e2fsprogsDirs = []string{"/usr/sbin", "/sbin"}

// RootImageSupport reports whether the kernel whose modules.builtin lists builtin (module names)
// and whose config file is configPath can boot from a root image: it needs virtio-pmem, the pmem
// driver and ext4 built in and CONFIG_FS_DAX=y. When it cannot, reason says what is missing. A
// missing config file means no: a root image the kernel cannot mount with DAX would not boot.
func RootImageSupport(builtin map[string]bool, configPath string) (ok bool, reason string, err error) {
	var missing []string
	for _, m := range rootImageBuiltins {
		if !builtin[m] {
			missing = append(missing, m)
		}
	}
	if len(missing) > 0 {
		return false, "kernel has no " + strings.Join(missing, ", ") + " built in", nil
	}
	f, err := os.Open(configPath)
	if errors.Is(err, fs.ErrNotExist) {
		return false, fmt.Sprintf("no kernel config %s to show %s=y", configPath, rootImageConfig), nil
	}
	if err != nil {
		return false, "", fmt.Errorf("kernel config: %w", err)
	}
	defer func() { _ = f.Close() }()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if strings.TrimSpace(sc.Text()) == rootImageConfig+"=y" {
			return true, "", nil
		}
	}
	if err := sc.Err(); err != nil {
		return false, "", fmt.Errorf("kernel config %s: %w", configPath, err)
	}
	return false, fmt.Sprintf("kernel config %s does not set %s=y", configPath, rootImageConfig), nil
}

// rootImageSize returns the image size for the tree: its files and directories in whole blocks,
// plus room for ext4's metadata, rounded up to RootImageAlign.
func rootImageSize(t *rootTree) int64 {
	// Superblock, group descriptors, bitmaps, the inode table, / and lost+found.
	n := int64(1 << 20)
	for _, e := range t.entries {
		switch {
		case e.mode.IsDir():
			n += ext4Block
		case e.mode.IsRegular():
			n += roundUp(e.size, ext4Block) + ext4Block // and an extent index block
		}
	}
	// Each 128 MiB block group may carry a backup superblock, descriptors and bitmaps; and slack
	// for extents split around metadata.
	n += (n>>27+1)*(256<<10) + n/64
	return roundUp(n, RootImageAlign)
}

// rootImageInodes is the inode count: the tree's entries, / and lost+found, ext4's reserved
// inodes, and spare.
func rootImageInodes(t *rootTree) int { return len(t.entries) + 32 }

func roundUp(n, to int64) int64 { return (n + to - 1) / to * to }

// rootImageIDs derives the filesystem UUID and directory hash seed from the tree's contents, so
// the same tree always gives the same image.
func rootImageIDs(t *rootTree, agentSHA256 string) (uuid, hashSeed string) {
	h := sha256.New()
	fmt.Fprintf(h, "podvm root image\nagent %s\n", agentSHA256)
	for _, e := range t.entries {
		fmt.Fprintf(h, "%s %o %d %d:%d\n", e.name, uint32(e.mode), e.size, e.devMajor, e.devMinor)
		h.Write(e.data)
	}
	sum := h.Sum(nil)
	return formatUUID(sum[:16]), formatUUID(sum[16:32])
}

// formatUUID formats 16 bytes as a version 4 (random) UUID.
func formatUUID(b []byte) string {
	u := bytes.Clone(b)
	u[6] = u[6]&0x0f | 0x40
	u[8] = u[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", u[0:4], u[4:6], u[6:8], u[8:10], u[10:16])
}

// writeRootImage makes the ext4 image of the tree at dst (an existing empty file) with mke2fs -d
// from a copy of the tree under tmp, then has debugfs add the device nodes and set every inode's
// owner, mode and times, which mke2fs copies from the staging files.
func writeRootImage(ctx context.Context, t *rootTree, agentSHA256, dst, tmp string) error {
	mke2fs, err := findE2fsprog("mke2fs")
	if err != nil {
		return err
	}
	debugfs, err := findE2fsprog("debugfs")
	if err != nil {
		return err
	}
	stage := filepath.Join(tmp, "root")
	if err := stageTree(ctx, t, stage); err != nil {
		return fmt.Errorf("stage the root tree: %w", err)
	}
	conf := filepath.Join(tmp, "mke2fs.conf")
	if err := os.WriteFile(conf, []byte(rootImageMke2fsConf), 0o644); err != nil {
		return err
	}
	script, err := debugfsScript(t)
	if err != nil {
		return err
	}
	scriptPath := filepath.Join(tmp, "debugfs.cmds")
	if err := os.WriteFile(scriptPath, []byte(script), 0o644); err != nil {
		return err
	}
	uuid, seed := rootImageIDs(t, agentSHA256)
	env := append(os.Environ(), "MKE2FS_CONFIG="+conf, "E2FSPROGS_FAKE_TIME="+strconv.Itoa(rootImageTime))
	if _, err := runE2fsprog(ctx, env, mke2fs, "-q", "-F", "-t", "ext4",
		"-b", strconv.Itoa(ext4Block), "-I", strconv.Itoa(ext4Inode), "-N", strconv.Itoa(rootImageInodes(t)),
		"-m", "0", "-O", "^has_journal,^resize_inode", "-L", RootImageLabel, "-U", uuid,
		"-E", "hash_seed="+seed+",root_owner=0:0,nodiscard", "-d", stage,
		dst, strconv.FormatInt(rootImageSize(t)>>10, 10)+"K"); err != nil {
		return err
	}
	stderr, err := runE2fsprog(ctx, env, debugfs, "-w", "-f", scriptPath, dst)
	if err != nil {
		return err
	}
	// debugfs exits 0 even when a command fails; it reports on stderr, after its version banner.
	if msg := debugfsErrors(stderr); msg != "" {
		return fmt.Errorf("debugfs on the root image: %s", msg)
	}
	return nil
}

// stageTree lays out the tree's directories and regular files under dir for mke2fs -d. Device
// nodes are left to debugfs: creating them here would need root.
func stageTree(ctx context.Context, t *rootTree, dir string) error {
	if err := os.Mkdir(dir, 0o755); err != nil {
		return err
	}
	for i := range t.entries {
		if err := ctx.Err(); err != nil {
			return err
		}
		e := &t.entries[i]
		p := filepath.Join(dir, filepath.FromSlash(e.name))
		switch {
		case e.mode.IsDir():
			if err := os.Mkdir(p, 0o755); err != nil {
				return err
			}
		case e.mode.IsRegular():
			if err := writeStagedFile(p, e); err != nil {
				return err
			}
		}
	}
	return nil
}

func writeStagedFile(p string, e *treeEntry) error {
	f, err := os.OpenFile(p, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return err
	}
	if err := e.writeContents(f); err != nil {
		_ = f.Close()
		return err
	}
	return f.Close()
}

// debugfsScript makes the device nodes and sets owner root, the tree's mode and the fixed time
// on every inode, including / and lost+found which mke2fs made.
func debugfsScript(t *rootTree) (string, error) {
	var b strings.Builder
	set := func(p string, mode uint32) {
		if mode != 0 {
			fmt.Fprintf(&b, "sif %s mode 0%o\n", p, mode)
		}
		for _, f := range []string{"uid", "gid"} {
			fmt.Fprintf(&b, "sif %s %s 0\n", p, f)
		}
		for _, f := range []string{"atime", "mtime", "ctime", "crtime"} {
			fmt.Fprintf(&b, "sif %s %s %d\n", p, f, rootImageTime)
		}
	}
	set("/", 0)
	set("/lost+found", 0)
	for _, e := range t.entries {
		if strings.ContainsAny(e.name, " \t\n\"\\") {
			return "", fmt.Errorf("root image: file name %q has a space, quote or backslash", e.name)
		}
		p := "/" + e.name
		if e.mode&fs.ModeDevice != 0 {
			kind := "b"
			if e.mode&fs.ModeCharDevice != 0 {
				kind = "c"
			}
			fmt.Fprintf(&b, "cd %s\nmknod %s %s %d %d\ncd /\n", path.Dir(p), path.Base(p), kind, e.devMajor, e.devMinor)
		}
		mode, err := unixMode(e.mode)
		if err != nil {
			return "", fmt.Errorf("root image: %s: %w", e.name, err)
		}
		set(p, mode)
	}
	return b.String(), nil
}

// debugfsErrors returns what debugfs wrote on stderr besides its version banner.
func debugfsErrors(stderr string) string {
	var lines []string
	for _, l := range strings.Split(stderr, "\n") {
		if l = strings.TrimSpace(l); l != "" && !strings.HasPrefix(l, "debugfs ") {
			lines = append(lines, l)
		}
	}
	return strings.Join(lines, "; ")
}

// findE2fsprog finds an e2fsprogs tool in PATH or e2fsprogsDirs.
func findE2fsprog(name string) (string, error) {
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	for _, d := range e2fsprogsDirs {
		p := filepath.Join(d, name)
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() && fi.Mode().Perm()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("%s not found (in PATH or %s), needed to build the root image: install e2fsprogs (`apt-get install e2fsprogs`)",
		name, strings.Join(e2fsprogsDirs, ", "))
}

// runE2fsprog runs an e2fsprogs tool and returns its stderr; a failure includes it.
func runE2fsprog(ctx context.Context, env []string, bin string, args ...string) (string, error) {
	var stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Env = env
	cmd.Stdout = io.Discard
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		if ctx.Err() != nil {
			return "", ctx.Err()
		}
		return "", fmt.Errorf("%s: %w: %s", filepath.Base(bin), err, strings.TrimSpace(stderr.String()))
	}
	return stderr.String(), nil
}
