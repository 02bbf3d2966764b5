# xenblkd — see README.md. Every target installs what it needs (scripts/setup.sh).
SHELL    := /bin/bash
# Go 1.26 is not in Debian 12: the official tarball lives in /usr/local/go.
export PATH := $(PATH):/usr/local/go/bin
GO       ?= go
export CGO_ENABLED := 0
BIN      := bin/xenblkd
# GOFLAGS for the build: static, no cgo (a dynamically linked Go binary costs
# ~1 ms more per exec, and the hotplug entry point is exec'd for every disk).
BUILDFLAGS = -trimpath -ldflags='-s -w -X main.version=$(VERSION)'
# The hotplug entry libxl execs per disk: one C file, static (an exec costs
# little more than the kernel's part; cmd/xenblkd-hotplug). It hands its
# error paths over to $(SBINDIR)/xenblkd. Flags as in test/build (EntryCFlags).
ENTRY        := bin/xenblkd-hotplug
ENTRY_CC     ?= gcc
ENTRY_CFLAGS := -std=c11 -O2 -static -Wall -Wextra -Wpedantic -Wshadow -Wconversion -Werror

.PHONY: all build setup check test test-unit test-stress test-e2e testbed testbed-debs bench bench-loop bench-io bench-sharing bench-xenstore demo chaos clean

all: build

setup:
	@scripts/setup.sh

build:
	$(GO) build $(BUILDFLAGS) -o $(BIN) ./cmd/xenblkd
	$(ENTRY_CC) $(ENTRY_CFLAGS) -DXENBLKD_BIN='"$(SBINDIR)/xenblkd"' -o $(ENTRY) cmd/xenblkd-hotplug/xenblkd-hotplug.c

# check: formatting and vet (part of `make test`).
check:
	@unformatted=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	if [ -n "$$unformatted" ]; then echo "gofmt needed: $$unformatted"; exit 1; fi
	$(GO) vet ./...

# CI (CI=true, as CI systems set it; .ci/run sets XENBLKD_TEST_STRICT itself)
# runs every test: a test that would skip for want of root, a package or a
# kernel feature fails instead (internal/testenv, docs/testing.md).
ifeq ($(CI),true)
export XENBLKD_TEST_STRICT ?= 1
endif

# test: the README's test command. Unit tests, then integration tests against
# the real kernel (loop), the real xenstored/oxenstored, and the real systemd
# (in a sandbox). -race needs cgo, so it is enabled for the test run only.
# Then the Xen testbed on every Debian release it has (test-e2e). The
# testbed's images are built (or found in the cache) beside the unit stage:
# debootstrap waits on the mirror and the disk, hardly on the CPU.
test: setup
	@scripts/setup.sh testbed
	@mkdir -p build
	@test/testbed/e2e.sh --images >build/testbed-images.log 2>&1 & images=$$!; \
	$(MAKE) --no-print-directory test-unit; unit=$$?; \
	wait $$images || { echo "make test: building the testbed images failed (test-e2e retries):"; tail -20 build/testbed-images.log; }; \
	exit $$unit
	@$(MAKE) --no-print-directory test-e2e

# test-unit: everything but the Xen testbed (a few minutes).
# The end-to-end tests run a second time through the C hotplug entry built
# with ASan and UBSan (test/build.TestEntry); test/entry runs both builds.
test-unit: setup check build
	CGO_ENABLED=1 $(GO) test -race -count=1 -timeout 30m ./...
	XENBLKD_TEST_ENTRY=sanitize CGO_ENABLED=1 $(GO) test -race -count=1 -timeout 10m ./cmd/xenblkd/

# test-stress: the unit and integration packages, STRESS_RUNS times, each run
# go test -race -count=STRESS_COUNT -cpu STRESS_CPU beside a stress-ng load
# (STRESS_LOAD, its arguments; empty for none), holding $(HEAVY_LOCK) for
# each run and its load; then a table of every test that failed at least
# once, with its first failure's output (test/stress, docs/testing.md).
# The default (3 runs) takes 30 to 50 minutes on the 2-core project machines
# (9 to 12.5 min a run on an Intel one, 15.5-17 min on the AMD EPYC one).
STRESS_RUNS  ?= 3
STRESS_COUNT ?= 1
STRESS_CPU   ?= 1,2,4
STRESS_LOAD  ?= --cpu 2 --hdd 1 --hdd-bytes 128M
STRESS_PKGS  ?= ./...
STRESS_RUN   ?=
HEAVY_LOCK   ?= /tmp/xenblkd-heavy.lock
test-stress: setup
	$(GO) run ./test/stress -runs $(STRESS_RUNS) -count $(STRESS_COUNT) -cpu $(STRESS_CPU) \
		-load '$(STRESS_LOAD)' -lock '$(HEAVY_LOCK)' -run '$(STRESS_RUN)' $(STRESS_PKGS)

## --- benchmarks -----------------------------------------------------------

# bench: the stock block script vs xenblkd (its C entry as the script) beside the
# exec floor (an empty static C program), driven as libxl drives them, against
# one private real xenstored (issue 6). Writes docs/benchmarks.md and
# docs/bench-scaling.png; root. `go run ./test/bench -quick` for a smoke run.
bench: setup build
	$(GO) run ./test/bench -bin $(BIN) -entry $(ENTRY) -out docs/benchmarks.md -plot docs/bench-scaling.png

bench-loop: setup
	CGO_ENABLED=1 $(GO) test -run '^$$' -bench . -skip SharingCheck -benchtime 300x -count 1 ./internal/loop/

# bench-sharing: the add's sharing check with 0, then 1,000 other bound loop
# devices + 1,000 unbound nodes (loop.Index vs the scan of every device).
# Makes and frees 2,000 loop devices (~15 s); root.
bench-sharing: setup
	CGO_ENABLED=1 $(GO) test -run '^$$' -bench SharingCheck -benchtime 1x -count 1 ./internal/loop/

# bench-io: buffered vs direct I/O on xenblkd's loop devices (issue 16): fio with
# direct=1 on the device, as blkback submits I/O, on ext4/XFS/Btrfs/tmpfs made in
# image files here; throughput and page-cache growth. Writes its own section of
# docs/benchmarks.md (make bench keeps it); root, about 2 minutes.
bench-io: setup
	CGO_ENABLED=1 $(GO) run ./test/benchio -out docs/benchmarks.md

bench-xenstore: setup
	CGO_ENABLED=1 $(GO) test -run '^$$' -bench . -count 1 ./internal/xenstore/

## --- fault injection --------------------------------------------------------

# chaos: the fault-injection storm of test/recovery (random adds/removes over
# many domains, SIGKILL of the daemon at random moments, with and without the
# systemd fd store) at a bigger size than `make test` runs it; prints the
# invariant counts (CHAOS lines). CHAOS_OPS/CHAOS_DOMAINS/CHAOS_SEED override.
CHAOS_OPS     ?= 5000
CHAOS_DOMAINS ?= 40
CHAOS_SEED    ?= 0
chaos: setup
	set -o pipefail; CGO_ENABLED=1 $(GO) test -race -count=1 -timeout 60m -v -run '^TestChaos$$' ./test/recovery/ \
		-args -chaos.ops $(CHAOS_OPS) -chaos.domains $(CHAOS_DOMAINS) -chaos.seed $(CHAOS_SEED) 2>&1 | grep -v 'level='

## --- Xen testbed (docs/testbed.md) -----------------------------------------

# testbed: build every release's dom0 image, or reuse the cached ones (rebuilt only when the
# release's recipe changes).
testbed:
	@scripts/setup.sh testbed
	test/testbed/e2e.sh --images

# test-e2e: real Xen under QEMU/TCG, one boot per Debian release (bookworm: Xen 4.17, trixie: Xen
# 4.20), the end-to-end suite in each, stock script vs xenblkd. Ends with `N passed, N failed`
# over both (the last part of `make test`; docs/testbed.md has the times).
test-e2e: testbed-debs build
	@scripts/setup.sh testbed
	test/testbed/e2e.sh

# testbed-debs: two packages of this tree for the testbed's install-and-upgrade test
# (test/testbed/dom0/tests.d/40-package.sh): an older version, installed first, and this one.
TESTBED_DEBS := build/testbed-debs
testbed-debs:
	rm -rf $(TESTBED_DEBS)
	$(MAKE) --no-print-directory deb VERSION=0.0.1~e2e BUILDDIR=$(TESTBED_DEBS)/old
	$(MAKE) --no-print-directory deb BUILDDIR=$(TESTBED_DEBS)/new

# demo: a guest with 4 disks through the stock script, then through xenblkd, with timings.
demo:
	@scripts/setup.sh testbed || echo "make demo: installing the testbed packages failed"
	@$(MAKE) --no-print-directory build || echo "make demo: make build failed: the xenblkd half will say so"
	@test/testbed/e2e.sh --demo

## --- install and package (docs/install.md) ----------------------------------

# Install layout; override on the command line, e.g.
#   make install DESTDIR=/tmp/stage PREFIX=/usr/local
DESTDIR      ?=
PREFIX       ?= /usr
SBINDIR      ?= $(PREFIX)/sbin
MANDIR       ?= $(PREFIX)/share/man
XENSCRIPTDIR ?= /etc/xen/scripts
UNITDIR      ?= /usr/lib/systemd/system
BUILDDIR     ?= build
UNIT         := dist/xenblkd.service
SOCKETUNIT   := dist/xenblkd.socket
MANPAGE      := docs/xenblkd.8

# The version: the VERSION file names the last release; a build N commits
# past the commit that set it is VERSION+N.gHASH (~dirty with uncommitted
# changes), so versions only go up along the history and a release sorts
# below its snapshots and above the previous ones. VERSION=... overrides.
VERSION_BASE := $(shell cat VERSION 2>/dev/null || echo 0)
VERSION_N    := $(shell n=$$(git rev-list --count $$(git log -1 --format=%H -- VERSION 2>/dev/null)..HEAD 2>/dev/null) && echo $$n)
VERSION      ?= $(VERSION_BASE)$(if $(filter-out 0,$(VERSION_N)),+$(VERSION_N).g$(shell git rev-parse --short=7 HEAD))$(if $(shell git status --porcelain --untracked-files=no 2>/dev/null),~dirty)
# A Debian version starts with a digit and has no "-" (no Debian revision:
# the package is native).
DEB_VERSION  ?= $(shell printf '%s\n' '$(VERSION)' | sed -E 's/^v([0-9])/\1/; /^[0-9]/!s/^/0~/; y/-_/++/')
# Set it to yours when you publish a package.
DEB_MAINTAINER ?= The xenblkd authors <xenblkd@example.org>
DEB          := $(BUILDDIR)/xenblkd_$(DEB_VERSION)_amd64.deb

.PHONY: install uninstall deb deb-version man check-unit

deb-version:
	@echo '$(DEB_VERSION)'

check-unit:
	@test -f $(UNIT) || { echo "make: $(UNIT) does not exist yet: the systemd unit is needed to install or package xenblkd" >&2; exit 1; }

man: $(BUILDDIR)/xenblkd.8.gz

$(BUILDDIR)/xenblkd.8.gz: $(MANPAGE)
	@mkdir -p $(BUILDDIR)
	gzip -9n < $(MANPAGE) > $@

# install: the binary, the hotplug entry libxl execs for script=xenblkd (the
# C program; it hands errors over to $(SBINDIR)/xenblkd), the unit
# (ExecStart= pointed at $(SBINDIR)) and the man page.
install: check-unit build man
	install -D -m 0755 $(BIN) $(DESTDIR)$(SBINDIR)/xenblkd
	install -d -m 0755 $(DESTDIR)$(XENSCRIPTDIR)
	rm -f $(DESTDIR)$(XENSCRIPTDIR)/xenblkd # was a link to the Go binary: replace, never write through it
	install -m 0755 $(ENTRY) $(DESTDIR)$(XENSCRIPTDIR)/xenblkd
	install -d -m 0755 $(DESTDIR)$(UNITDIR)
	sed 's|/usr/sbin/xenblkd|$(SBINDIR)/xenblkd|g' $(UNIT) > $(DESTDIR)$(UNITDIR)/xenblkd.service
	chmod 0644 $(DESTDIR)$(UNITDIR)/xenblkd.service
	# socket activation: the API socket systemd holds across daemon restarts
	install -m 0644 $(SOCKETUNIT) $(DESTDIR)$(UNITDIR)/xenblkd.socket
	install -D -m 0644 $(BUILDDIR)/xenblkd.8.gz $(DESTDIR)$(MANDIR)/man8/xenblkd.8.gz
	@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then \
		systemctl daemon-reload; \
		echo "installed; now: systemctl enable --now xenblkd.socket xenblkd, then use script=xenblkd (docs/install.md)"; \
	fi

# uninstall: removes exactly what install put there. With DESTDIR it also
# removes the directories install made that are left empty.
uninstall:
	rm -f $(DESTDIR)$(SBINDIR)/xenblkd $(DESTDIR)$(XENSCRIPTDIR)/xenblkd \
		$(DESTDIR)$(UNITDIR)/xenblkd.service $(DESTDIR)$(UNITDIR)/xenblkd.socket $(DESTDIR)$(MANDIR)/man8/xenblkd.8.gz
	@if [ -n "$(DESTDIR)" ]; then \
		for d in $(SBINDIR) $(XENSCRIPTDIR) $(UNITDIR) $(MANDIR)/man8; do \
			rmdir -p --ignore-fail-on-non-empty $(DESTDIR)$$d 2>/dev/null || true; \
		done; \
	fi

# deb: a Debian package of the same layout, built without fakeroot
# (--root-owner-group). The control file and maintainer scripts are in
# dist/debian/; docs (copyright, changelog), the lintian override and md5sums
# are added here. `lintian build/xenblkd_*.deb` is clean (test/install).
DOCDIR := /usr/share/doc/xenblkd
# Units under /usr/lib: /lib is an alias of /usr/lib on Debian 12 and 13 (merged /usr), and
# Debian 13's lintian reports files under the alias (aliased-location); Debian 12's accepts both.
# Overridable only so a test can build a package of the old layout and upgrade from it.
DEB_UNITDIR ?= /usr/lib/systemd/system
deb: check-unit build man
	rm -rf $(BUILDDIR)/deb
	$(MAKE) --no-print-directory install DESTDIR=$(abspath $(BUILDDIR))/deb PREFIX=/usr SBINDIR=/usr/sbin \
		MANDIR=/usr/share/man UNITDIR=$(DEB_UNITDIR) XENSCRIPTDIR=/etc/xen/scripts
	# stripped as dh_strip does (make install keeps the symbols for debugging)
	strip --remove-section=.comment --remove-section=.note --strip-unneeded $(BUILDDIR)/deb/etc/xen/scripts/xenblkd
	install -D -m 0644 dist/debian/copyright $(BUILDDIR)/deb$(DOCDIR)/copyright
	scripts/deb-changelog.sh '$(DEB_VERSION)' '$(DEB_MAINTAINER)' | gzip -9n > $(BUILDDIR)/deb$(DOCDIR)/changelog.gz
	chmod 0644 $(BUILDDIR)/deb$(DOCDIR)/changelog.gz
	install -D -m 0644 dist/metrics-tcp.conf $(BUILDDIR)/deb$(DOCDIR)/examples/metrics-tcp.conf
	install -D -m 0644 dist/debian/lintian-overrides $(BUILDDIR)/deb/usr/share/lintian/overrides/xenblkd
	install -d -m 0755 $(BUILDDIR)/deb/DEBIAN
	sed -e 's|@VERSION@|$(DEB_VERSION)|' -e 's|@MAINTAINER@|$(DEB_MAINTAINER)|' \
		-e "s|@INSTALLED_SIZE@|$$(du -sk --exclude=DEBIAN $(BUILDDIR)/deb | cut -f1)|" \
		dist/debian/control > $(BUILDDIR)/deb/DEBIAN/control
	install -m 0755 dist/debian/postinst dist/debian/prerm dist/debian/postrm $(BUILDDIR)/deb/DEBIAN/
	cd $(BUILDDIR)/deb && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | LC_ALL=C sort -z | \
		xargs -0 md5sum > DEBIAN/md5sums
	chmod 0644 $(BUILDDIR)/deb/DEBIAN/md5sums
	dpkg-deb --build --root-owner-group $(BUILDDIR)/deb $(DEB)
	@echo "built $(DEB)"

clean:
	rm -rf bin build
