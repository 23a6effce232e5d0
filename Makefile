# husk: the two commands a newcomer needs are `make demo` and `make test`.
# Each target does its own setup (dependencies, build, guest kernel, initrd).

SHELL := /bin/bash
CARGO ?= cargo
BUILD_DIR := $(CURDIR)/build
HOST_TRIPLE := x86_64-unknown-linux-gnu
AGENT_BIN := target/$(HOST_TRIPLE)/guest/husk-agent
KERNEL := $(BUILD_DIR)/vmlinux
BZIMAGE := $(BUILD_DIR)/bzImage
INITRD := $(BUILD_DIR)/initramfs.cpio.gz
PREFIX ?= /usr/local
SHARE_DIR ?= /usr/share/husk

# Debian packages husk needs on the host: the peers and parts it runs with
# (containerd, runc, QEMU, busybox for test images), and what the guest
# kernel build needs.
DEB_PACKAGES := containerd runc qemu-system-x86 linux-source-6.12 busybox-static prometheus \
	containernetworking-plugins bc bison flex libelf-dev libssl-dev cpio xz-utils \
	kmod rsync dwarves protobuf-compiler tmux iproute2 python3 gcc make

export HUSK_KERNEL := $(KERNEL)
export HUSK_BZIMAGE := $(BZIMAGE)
export HUSK_INITRD := $(INITRD)

.PHONY: all deps build agent kernel initrd guest hooked-shim test bench demo demo-vmm install clean lint fuzz

all: build

## deps: install the Debian packages (idempotent: installs only what is missing).
deps:
	@missing=$$(for p in $(DEB_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "deps: installing:" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	else echo "deps: all Debian packages present"; fi

## build: host binaries (shim, VMM debug tool, runtime CLI) and the static agent.
build: agent
	$(CARGO) build --release --workspace --exclude husk-agent

## hooked-shim: a second, test-only shim (containerd-shim-huskhooks-v2)
## with guest-reachable test hooks, in its own target directory so no
## product binary ever carries them; the e2e tier runs it.
HOOKED_TARGET := target/test-hooks
hooked-shim:
	$(CARGO) build --release -p husk-shim --features test-hooks --target-dir $(HOOKED_TARGET)
	install -D -m 0755 $(HOOKED_TARGET)/release/containerd-shim-kata-v2 $(HOOKED_TARGET)/bin/containerd-shim-huskhooks-v2

agent:
	RUSTFLAGS="-C target-feature=+crt-static" $(CARGO) build --profile guest -p husk-agent --target $(HOST_TRIPLE)

## kernel: the guest kernel, cached by source version and config hash.
kernel: deps
	OUT_DIR=$(BUILD_DIR) guest-kernel/build.sh

## initrd: the guest initramfs with husk-agent as /init.
initrd: agent
	@mkdir -p $(BUILD_DIR)
	python3 rootfs-image/mkinitramfs.py $(AGENT_BIN) $(INITRD)

guest: kernel initrd

## test: every test tier this machine supports, with one summary line per tier.
test: deps build guest hooked-shim
	tests/run-tiers.sh

## bench: speed and memory figures against peers measured in the same run.
bench: deps build guest
	tests/run-bench.sh

## demo: a container in a husk microVM through containerd (ctr): its
## output, the guest kernel beside the host's, the shim and VM processes.
demo: deps build guest
	tests/e2e/demo-ctr.sh

## demo-vmm: the guest kernel and agent booted directly (built-in VMM, then QEMU).
demo-vmm: deps build guest
	tests/demo.sh

## lint: rustfmt and clippy (warnings are errors), as CI runs them.
lint: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy -p husk-devices --features test-hooks -- -D warnings

## fuzz: every fuzz target for FUZZ_SECONDS seconds each (libFuzzer on
## nightly; installs cargo-fuzz if missing); one result line per target,
## non-zero on a crash. See fuzz/README.md.
FUZZ_SECONDS ?= 60
fuzz:
	FUZZ_SECONDS=$(FUZZ_SECONDS) CARGO=$(CARGO) fuzz/run.sh

install: build guest
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(SHARE_DIR)
	install -m 0755 target/release/containerd-shim-kata-v2 target/release/husk-vmm target/release/husk-ctl $(DESTDIR)$(PREFIX)/bin/
	install -m 0644 $(KERNEL) $(DESTDIR)$(SHARE_DIR)/vmlinux
	install -m 0644 $(BZIMAGE) $(DESTDIR)$(SHARE_DIR)/bzImage
	install -m 0644 $(INITRD) $(DESTDIR)$(SHARE_DIR)/initramfs.cpio.gz
	install -d $(DESTDIR)/etc/husk
	@if [ -e $(DESTDIR)/etc/husk/configuration.toml ]; then \
		echo "keeping the existing $(DESTDIR)/etc/husk/configuration.toml"; \
	else install -m 0644 shim/configuration.toml $(DESTDIR)/etc/husk/configuration.toml; fi
	@echo "installed husk into $(DESTDIR)$(PREFIX)/bin and $(DESTDIR)$(SHARE_DIR)"
	@echo
	@cat shim/containerd-snippet.toml

clean:
	$(CARGO) clean
	rm -rf $(BUILD_DIR)
