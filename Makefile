# The two commands of the README: `make demo` and `make test`. Everything else is a step of those.
SHELL := /bin/bash
CACHE ?= $(or $(BACKDOORS_CACHE),$(HOME)/.cache/backdoors)
IMAGES_ENV := $(CACHE)/images.env
CARGO ?= cargo

.PHONY: all deps images build release test lint bench demo clean-cache

all: build

deps:
	scripts/install-deps.sh

# Builds (or reuses from the cache) the guest kernels and the initramfs.
images: deps
	images/build.sh

build:
	$(CARGO) build --workspace --all-targets

release:
	$(CARGO) build --release -p bdvmm

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# The whole suite: unit tests, then end-to-end tests on real guests.
test: images build
	BD_IMAGES_ENV=$(IMAGES_ENV) $(CARGO) test --workspace -- --test-threads=2

bench: images release
	BD_IMAGES_ENV=$(IMAGES_ENV) $(CARGO) bench -p backdoors-tests --bench vmm

# Boots a guest under bdvmm and runs a bounded fork bomb next to a "useful" program.
demo: images release
	scripts/demo.sh

clean-cache:
	rm -rf $(CACHE)
