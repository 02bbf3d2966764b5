# xenblkd — see README.md. Every target installs what it needs (scripts/setup.sh).
SHELL    := /bin/bash
GO       ?= go
export CGO_ENABLED := 0
BIN      := bin/xenblkd
# GOFLAGS for the build: static, no cgo (a dynamically linked Go binary costs
# ~1 ms more per exec, and the hotplug entry point is exec'd for every disk).
BUILDFLAGS := -trimpath -ldflags='-s -w'

.PHONY: all build setup check test test-unit test-e2e bench bench-loop bench-xenstore demo chaos clean

all: build

setup:
	@scripts/setup.sh

build:
	$(GO) build $(BUILDFLAGS) -o $(BIN) ./cmd/xenblkd

# check: formatting and vet (part of `make test`).
check:
	@unformatted=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	if [ -n "$$unformatted" ]; then echo "gofmt needed: $$unformatted"; exit 1; fi
	$(GO) vet ./...

# test: the README's test command. Unit tests, then integration tests against
# the real kernel (loop), the real xenstored/oxenstored, and the real systemd
# (in a sandbox). -race needs cgo, so it is enabled for the test run only.
test: setup check build
	CGO_ENABLED=1 $(GO) test -race -count=1 -timeout 30m ./...

## --- benchmarks -----------------------------------------------------------

bench-loop: setup
	CGO_ENABLED=1 $(GO) test -run '^$$' -bench . -benchtime 300x -count 1 ./internal/loop/

bench-xenstore: setup
	CGO_ENABLED=1 $(GO) test -run '^$$' -bench . -count 1 ./internal/xenstore/

## --- demo -----------------------------------------------------------------

demo:
	@echo "make demo: not yet: the Xen testbed demo (issue 8) does not exist yet."; exit 1

clean:
	rm -rf bin build
