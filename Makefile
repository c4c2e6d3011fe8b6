# podvisor — build, run, test, bench. `make` boots the guest; `make test` runs every tier.
# Every system dependency is installed from here (scripts/install-deps.sh), never by hand.

SHELL := /bin/bash
CARGO ?= cargo
PROFILE ?= release
OUT ?= $(CURDIR)/out
export PODVISOR_CACHE ?= $(HOME)/.cache/podvisor

CARGO_PROFILE_FLAG := $(if $(filter release,$(PROFILE)),--release,)
TARGET_DIR := $(or $(CARGO_TARGET_DIR),$(CURDIR)/target)
BIN := $(TARGET_DIR)/$(if $(filter release,$(PROFILE)),release,debug)/podvisor
INITRD := $(OUT)/boot-test.cpio

.DEFAULT_GOAL := run
.PHONY: run deps build guest-kernel rootfs test test-unit test-guest lint fuzz bench bench-boot bench-devices bench-density bench-alloc-free bench-template bench-net clean

## deps: install system packages (Debian) the build and tests need.
deps:
	@bash scripts/install-deps.sh

## build: the podvisor binaries.
build: deps
	$(CARGO) build $(CARGO_PROFILE_FLAG) -p podvisor --bins

## guest-kernel: build (or reuse from the cache) the guest vmlinux; prints its path.
guest-kernel: deps
	@bash guest-kernel/build.sh

## rootfs: the test initramfs images: boot-test (busybox init that marks the boot timer and
## powers off) and devices-test (runs the guest side of the virtio device checks).
rootfs: deps
	@mkdir -p $(OUT)
	@bash rootfs/build-initramfs.sh $(OUT) boot-test
	@bash rootfs/build-initramfs.sh $(OUT) devices-test
	@bash rootfs/build-initramfs.sh $(OUT) agent-test

## run: build everything and boot the guest with its console on this terminal.
run: build rootfs
	@kernel=$$(bash guest-kernel/build.sh) && \
	  $(BIN) boot --kernel "$$kernel" --initrd $(INITRD) --timings

## test: lint, then every test binary of the workspace side by side (unit, host-side and
## the guest tier on real KVM; scripts/run-tests.sh; the guest tests share one VM slot per
## core). Dev profile: the guest's speed does not depend on it, and it compiles faster.
## The guest kernel builds (or comes from its cache) in the background meanwhile: a cold
## kernel build and the Rust builds each leave a core idle at times on a small host.
test: deps
	@mkdir -p $(OUT)
	@bash guest-kernel/build.sh > $(OUT)/.guest-kernel-path & kernel_pid=$$!; \
	  $(MAKE) --no-print-directory lint rootfs && $(CARGO) test --workspace --no-run --quiet; \
	  rc=$$?; \
	  if ! wait $$kernel_pid; then echo "make test: the guest kernel build failed"; exit 1; fi; \
	  [ $$rc = 0 ] || exit $$rc; \
	  PODVISOR_KERNEL="$$(cat $(OUT)/.guest-kernel-path)" PODVISOR_INITRD=$(INITRD) \
	  CARGO="$(CARGO)" bash scripts/run-tests.sh --test-threads=8

## test-unit: unit and host-side tests only (no guest kernel needed).
test-unit: deps
	$(CARGO) test --workspace

## fuzz: every cargo-fuzz target (the parsers a guest feeds: MMIO registers, virtio-blk,
## virtio-fs, virtio-vsock, net headers; the snapshot state and the agent stream header)
## for FUZZ_SECS seconds each, seeded from fuzz/corpus/ (installs nightly and cargo-fuzz).
FUZZ_SECS ?= 30
fuzz: deps
	@bash scripts/fuzz.sh $(FUZZ_SECS)

## lint: formatting and clippy, warnings are errors.
lint: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## bench: every benchmark table.
bench: bench-boot bench-devices bench-density bench-alloc-free bench-template bench-net

## bench-boot: boot figures for 1 vCPU / 128 MiB, median of 3 fresh processes.
bench-boot: build rootfs
	@kernel=$$(bash guest-kernel/build.sh) && \
	  $(BIN) bench boot --kernel "$$kernel" --initrd $(INITRD) --runs 3 --vcpus 1 --mem-mib 128

## bench-devices: virtio-blk/fs/vsock throughput (MiB/s, req/s at 4 KiB and 1 MiB) and
## virtio-net (frames of 1514 and 64000 bytes on a tap; root) through the virtio-mmio
## transport from a host-side driver, against raw file/socket/tap baselines (~30 s).
bench-devices:
	$(CARGO) bench -p devices --features test-utils --bench devices

# $(call bench_pods,NAME,ARGS[,OUTNAME]): `podvisor bench NAME ARGS` with the guest kernel and
# the agent initramfs (built or reused), writing into $(OUT)/bench-OUTNAME (default NAME).
define bench_pods
	@mkdir -p $(OUT)
	@bash rootfs/build-initramfs.sh $(OUT) agent-test
	@kernel=$$(bash guest-kernel/build.sh) && \
	  $(BIN) bench $(1) $(2) --kernel "$$kernel" \
	    --initrd $(OUT)/agent-test.cpio --out $(OUT)/bench-$(or $(3),$(1))
endef

## bench-density: N idle busybox pods through a private containerd, podvisor next to runc:
## start latency, host PSS per pod (guest RAM vs VMM/shim overhead), machine memory per
## pod; writes $(OUT)/bench-density/density.{md,json,png}. DENSITY_ARGS overrides the size
## and the knobs (e.g. DENSITY_ARGS="--pods 10 --parallel 2 --ksm on"). ~5 min here.
DENSITY_ARGS ?= --pods 4 --parallel 2 --runtime both --mem-mib 128
bench-density: build
	$(call bench_pods,density,$(DENSITY_ARGS))

## bench-alloc-free: pods that touch --alloc-mib MiB, free it and idle, podvisor next to
## runc: host PSS per pod before, at the peak, right after the free and --reclaim-wait s
## later (free page reporting gives the guest's freed memory back); writes
## $(OUT)/bench-alloc-free/density.{md,json}. ~6 min here: the
## emulated guest kernel touches about 1 MiB/s.
ALLOC_FREE_ARGS ?= --pods 1 --runtime both --scenario alloc-free --alloc-mib 200 --mem-mib 384
bench-alloc-free: build
	$(call bench_pods,density,$(ALLOC_FREE_ARGS),alloc-free)

## bench-template: pod start from a template clone vs a cold boot vs runc, and the clones'
## memory split into shared template pages and private pages at N = 1, 10, 50; writes
## $(OUT)/bench-template/template.{md,json,png}. TEMPLATE_ARGS overrides (e.g.
## TEMPLATE_ARGS="--clones 1,10 --parallel 2"). The 50 clones each create a container in an
## emulated guest kernel on this host: about an hour here.
TEMPLATE_ARGS ?= --clones 1,10,50 --parallel 2 --mem-mib 128
bench-template: build
	$(call bench_pods,template,$(TEMPLATE_ARGS))

## bench-net: TCP connect, request/response and stream throughput both ways between a pod
## and a peer network namespace over a veth (podvisor's virtio-net + tc mirred path next to
## runc on the veth); writes $(OUT)/bench-net/net.{md,json}. NET_ARGS overrides (e.g.
## NET_ARGS="--seconds 10 --runtime podvisor"). A few minutes here (one template build).
NET_ARGS ?= --seconds 5 --mem-mib 128
bench-net: build
	$(call bench_pods,net,$(NET_ARGS))

clean:
	$(CARGO) clean
	rm -rf $(OUT)
