# podvm — build, test and demo. Everything runs as root on Debian 12; `make deps` installs
# what is missing (apt packages, pinned Go tools into $(PODVM_DEV), the kernel source and package).

SHELL       := /bin/bash
PODVM_DEV   ?= /opt/podvm-dev
PREFIX      ?= /usr/local
DESTDIR     ?=
GO          ?= $(shell command -v go || echo /usr/local/go/bin/go)
export PATH := $(PODVM_DEV)/bin:$(dir $(GO)):$(PATH)

BIN         := $(CURDIR)/bin
OUT         := $(CURDIR)/_output
IMAGE_DIR   := $(OUT)/image
KERNEL_DEB   = $(lastword $(sort $(wildcard $(PODVM_DEV)/kernel/linux-image-*.deb)))
VERSION     ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
LDFLAGS     := -s -w -X github.com/podvm/podvm/version.Version=$(VERSION)
# The agent is PID 1 of the guest: one static binary, with libcontainer's cgo parts (nsenter,
# seccomp) linked in.
AGENT_TAGS  := seccomp netgo osusergo
# Integration tests under `go test -timeout`; the suite budget is 30 minutes.
IT_TIMEOUT  ?= 30m
IT_RUN      ?= .

.PHONY: all deps build agent shim cli kernel image proto unit integration e2e e2e-template lint test demo bench install uninstall dist deb installer-image clean

all: build

deps:
	bash hack/deps.sh

build: agent shim cli

# Built against google.golang.org/protobuf with agent/detrand in place of its detrand, which
# reads no file (hack/agent-modfile.sh; agent/detrand's doc says why).
agent:
	GO=$(GO) bash hack/agent-modfile.sh $(OUT)/agent-mod
	CGO_ENABLED=1 $(GO) build -trimpath -tags '$(AGENT_TAGS)' -modfile $(OUT)/agent-mod/go.mod \
		-ldflags '$(LDFLAGS) -extldflags -static' -o $(BIN)/podvm-agent ./cmd/podvm-agent

shim:
	@if [ -d cmd/containerd-shim-podvm-v2 ]; then \
		CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN)/containerd-shim-podvm-v2 ./cmd/containerd-shim-podvm-v2; fi

cli:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN)/podvm ./cmd/podvm

# The guest kernel: Debian's linux-source-6.1 with tinyconfig + kernel/config/*.config, everything
# built in (docs/kernel.md). Cached in $(PODVM_DEV)/kernel-build/<hash of source and config>, so a
# machine builds each config once (several minutes); later runs take a second.
kernel:
	PODVM_DEV=$(PODVM_DEV) bash kernel/build.sh >/dev/null

# The guest image for tests and the demo (install puts it in /usr/share/podvm).
# KERNEL=built (default): the kernel of `make kernel`; KERNEL=deb: Debian's cloud kernel package
# (make deps downloads it), its modules in the initrd; any other value: a kernel package or tree.
KERNEL      ?= built
IMAGE_KERNEL = $(if $(filter built,$(KERNEL)),$(shell PODVM_DEV=$(PODVM_DEV) bash kernel/build.sh --dir),$(if $(filter deb,$(KERNEL)),$(KERNEL_DEB),$(KERNEL)))

image: agent cli $(if $(filter built,$(KERNEL)),kernel)
	@[ -n "$(IMAGE_KERNEL)" ] || { echo "no guest kernel (KERNEL=$(KERNEL)): run 'make deps'" >&2; exit 1; }
	$(BIN)/podvm image build --kernel $(IMAGE_KERNEL) --agent $(BIN)/podvm-agent --output $(IMAGE_DIR)

proto:
	protoc -I agent/api --go_out=paths=source_relative:agent/api \
		--go-ttrpc_out=paths=source_relative:agent/api agent/api/agent.proto

# Lint: gofmt, go vet and golangci-lint (.golangci.yml, pinned in hack/deps.sh), each over both
# build configurations: the default one, and the agent's (its tags, cgo) as bin/podvm-agent is built.
# Without golangci-lint (no `make deps` yet) that part is skipped locally and fails under CI=true.
GOLANGCI_LINT ?= $(PODVM_DEV)/bin/golangci-lint
AGENT_PKGS  := ./cmd/podvm-agent/... ./agent/...

lint:
	@bad=$$(gofmt -l $$(git ls-files '*.go')); [ -z "$$bad" ] || { echo "gofmt needed: $$bad" >&2; exit 1; }
	$(GO) vet ./...
	CGO_ENABLED=1 $(GO) vet -tags '$(AGENT_TAGS)' $(AGENT_PKGS)
	$(GO) vet -tags realvm ./hypervisor/qemu/
	@if [ ! -x $(GOLANGCI_LINT) ]; then \
		if [ "$$CI" = true ]; then echo "lint: $(GOLANGCI_LINT) missing: run 'make deps'" >&2; exit 1; fi; \
		echo "lint: skipping golangci-lint, $(GOLANGCI_LINT) is missing: run 'make deps'" >&2; exit 0; fi; \
	set -x; $(GOLANGCI_LINT) run ./... && \
	$(GOLANGCI_LINT) run --build-tags realvm ./hypervisor/qemu/ && \
	CGO_ENABLED=1 $(GOLANGCI_LINT) run --build-tags '$(AGENT_TAGS)' $(AGENT_PKGS)

# Unit tests, race-detected: no root, no QEMU (fakes stand in).
unit:
	$(GO) test -race -count=1 $$($(GO) list ./... | grep -v /integration)

# Integration tests: real containerd, QEMU, CNI and guest kernel. They find the binaries and the
# guest image through these variables.
# The real-QEMU tests of hypervisor/qemu (-tags realvm) run first, then the CRI-level suite.
integration: build image
	@mkdir -p $(OUT)
	PODVM_BIN=$(BIN) PODVM_IMAGE_DIR=$(IMAGE_DIR) PODVM_DEV=$(PODVM_DEV) PODVM_IT_ARTIFACTS=$(OUT)/artifacts \
		PODVM_DEB=$$(bash hack/package.sh deb) bash -o pipefail -c '$(GO) test -count=1 -timeout 10m -tags realvm -v -run "$(IT_RUN)" ./hypervisor/qemu/ && \
		$(GO) test -count=1 -timeout $(IT_TIMEOUT) -v -run "$(IT_RUN)" $$($(GO) list ./integration/... | grep -v /integration/e2e)' \
		2>&1 | tee $(OUT)/integration.log; exit $${PIPESTATUS[0]}

# End to end: a single-node Kubernetes ($(PODVM_DEV)/k8s, built by `make deps`) on the harness's
# containerd; every case for RuntimeClass runc and podvm (docs/e2e.md). E2E_RUN selects cases
# (make e2e E2E_RUN='TestE2E/podvm/exec').
E2E_TIMEOUT ?= 45m
E2E_RUN     ?= .

e2e: build image
	@mkdir -p $(OUT)
	PODVM_BIN=$(BIN) PODVM_IMAGE_DIR=$(IMAGE_DIR) PODVM_DEV=$(PODVM_DEV) PODVM_IT_ARTIFACTS=$(OUT)/artifacts \
		$(GO) test -count=1 -timeout $(E2E_TIMEOUT) -parallel 8 -v -run '$(E2E_RUN)' ./integration/e2e/ 2>&1 | tee $(OUT)/e2e.log; \
		exit $${PIPESTATUS[0]}

# The e2e suite's podvm cases again with templated start: every pod VM restored from a VM
# template ([template] enabled; docs/templating.md), which is off by default. The soak case
# runs 30 cycles instead of 100, to keep make test within its time.
E2E_TEMPLATE_RUN  ?= TestE2E/podvm/
E2E_TEMPLATE_SOAK ?= 30

e2e-template: build image
	@mkdir -p $(OUT)
	PODVM_IT_TEMPLATE=1 PODVM_E2E_SOAK=$(E2E_TEMPLATE_SOAK) PODVM_BIN=$(BIN) PODVM_IMAGE_DIR=$(IMAGE_DIR) PODVM_DEV=$(PODVM_DEV) PODVM_IT_ARTIFACTS=$(OUT)/artifacts \
		$(GO) test -count=1 -timeout $(E2E_TIMEOUT) -parallel 8 -v -run '$(E2E_TEMPLATE_RUN)' ./integration/e2e/ 2>&1 | tee $(OUT)/e2e-template.log; \
		exit $${PIPESTATUS[0]}

test: deps
	@mkdir -p $(OUT)
	$(MAKE) build image lint unit integration e2e e2e-template

# The demo is TestDemo: a busybox pod in its own VM through containerd's CRI, narrated.
demo: deps
	@mkdir -p $(OUT)
	$(MAKE) build image
	PODVM_BIN=$(BIN) PODVM_IMAGE_DIR=$(IMAGE_DIR) PODVM_DEV=$(PODVM_DEV) \
		$(GO) test -count=1 -run '^TestDemo$$' ./integration/ -v 2>&1 | grep -E '^(demo:|--- |ok|FAIL|panic)|_test.go'; \
		exit $${PIPESTATUS[0]}

# Benchmarks: podvm against runc in the same run (docs/benchmarks.md). BENCH selects some
# (make bench BENCH='RunPodSandbox|PodMemory'); the output is kept in _output/bench.txt for benchstat.
BENCH       ?= .
BENCHTIME   ?= 10x

bench: deps
	@mkdir -p $(OUT)
	$(MAKE) build image
	PODVM_BIN=$(BIN) PODVM_IMAGE_DIR=$(IMAGE_DIR) PODVM_DEV=$(PODVM_DEV) \
		$(GO) test -count=1 -run '^$$' -bench '$(BENCH)' -benchtime $(BENCHTIME) -timeout 60m -v ./integration/... 2>&1 \
		| tee $(OUT)/bench.txt; exit $${PIPESTATUS[0]}

# Install on this node, or into $(DESTDIR) for image bakers (make install DESTDIR=/tmp/root):
# binaries into $(PREFIX)/bin, the guest image and the RuntimeClass into /usr/share/podvm, the
# containerd drop-in into /etc/containerd/conf.d (containerd's config.toml must import it, see
# docs/install.md). An existing /etc/podvm/config.toml is never overwritten.
# podvm install does the work (it is what a node without this tree runs too). Onto / it records
# what it wrote in /var/lib/podvm/install.json, for make uninstall.
install: build image
	$(BIN)/podvm install --root $(or $(DESTDIR),/) --prefix $(PREFIX) --image $(IMAGE_DIR)

# Remove what make install put onto this node, as recorded: its files (the node config only if
# unchanged), the directories it made, the accelerator probe's cache. Restart containerd after.
uninstall: cli
	$(BIN)/podvm uninstall --root /

# Packages for node image bakers (hack/package.sh, docs/install.md): the install tree of
# `podvm install --root` with binaries in /usr/bin, as a tarball and as a Debian package.
dist: build image
	bash hack/package.sh dist

deb: build image
	bash hack/package.sh deb

# The DaemonSet installer's image (deploy/installer.yaml), built without Docker.
installer-image: dist
	$(BIN)/podvm node image --dist $(OUT)/dist/root --output $(OUT)/podvm-installer.tar --created $$(git log -1 --format=%ct)

clean:
	rm -rf $(BIN) $(OUT)
