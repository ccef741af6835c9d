# The two commands of the README: `make demo` and `make test`. Everything else is a step of those.
SHELL := /bin/bash
CACHE ?= $(or $(BACKDOORS_CACHE),$(HOME)/.cache/backdoors)
IMAGES_ENV := $(CACHE)/images.env
CARGO ?= cargo
# make demo ENGINE=kvm|tcg|auto (kvm on a CPU without vmx/svm runs inside a kvm host)
ENGINE ?= $(or $(DEMO_ENGINE),auto)

.PHONY: all deps images build release rxe-bins test lint bench demo experiments scale fuzz clean-cache

all: build

deps:
	scripts/install-deps.sh

# Builds (or reuses from the cache) the guest kernels and the initramfs.
images: deps
	images/build.sh

build:
	$(CARGO) build --workspace --all-targets

# The binaries a kvm host carries (bd-kvmhost is its agent and launcher), bdmon, and the auction
# service (the failover bench's front end).
release:
	$(CARGO) build --release -p bdvmm -p rdma-bridge -p bdmon -p bd-auction
	$(CARGO) build --release -p backdoors-tests --bin bd-kvmhost

# The SoftRoCE VM's programs (tests/tests/rxe.rs): rdma-bridge and bd-verbs-check with the
# verbs feature, copied to <target>/rxe/ so that `make release` (the kvm hosts' rdma-bridge,
# without verbs) does not replace them. Built before `release`, which then rebuilds only the
# rdma-bridge binary without the feature.
TARGET_DIR := $(or $(CARGO_TARGET_DIR),target)
rxe-bins:
	$(CARGO) build --release -p rdma-bridge --features verbs --bins
	mkdir -p $(TARGET_DIR)/rxe
	cp $(TARGET_DIR)/release/rdma-bridge $(TARGET_DIR)/release/bd-verbs-check $(TARGET_DIR)/rxe/

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy -p rdma-bridge --features verbs --all-targets -- -D warnings

# The whole suite: unit tests, then end-to-end tests on real guests, both engines (the kvm engine
# inside kvm hosts, which carry the release binaries; the SoftRoCE VM, which carries rxe-bins).
test: images build rxe-bins release
	guest-kernel-patches/check.sh
	BD_IMAGES_ENV=$(IMAGES_ENV) $(CARGO) nextest run --workspace --test-threads 2
	$(CARGO) test --workspace --doc
	$(CARGO) test -p rdma-bridge --features verbs --lib --test verbs --test guard -- --nocapture

# Benchmarks on real guests; sb_cost also builds the kernel variant without the Sensor Box.
bench: images release
	BD_IMAGES_ENV=$(IMAGES_ENV) $(CARGO) bench -p backdoors-tests --bench vmm
	BD_IMAGES_ENV=$(IMAGES_ENV) $(CARGO) bench -p backdoors-tests --bench introspect
	BD_IMAGES_ENV=$(IMAGES_ENV) $(CARGO) bench -p backdoors-tests --bench bridge
	$(CARGO) bench -p backdoors-tests --bench statebox
	BD_IMAGES_ENV=$(IMAGES_ENV) $(CARGO) bench -p backdoors-tests --bench bdmon
	BD_IMAGES_ENV=$(IMAGES_ENV) $(CARGO) bench -p backdoors-tests --bench devices
	BD_IMAGES_ENV=$(IMAGES_ENV) $(CARGO) bench -p backdoors-tests --bench service
	BD_IMAGES_ENV=$(IMAGES_ENV) $(CARGO) bench -p backdoors-tests --bench attach
	BD_IMAGES_ENV=$(IMAGES_ENV) $(CARGO) bench -p backdoors-tests --bench cpu
	BD_IMAGES_ENV=$(IMAGES_ENV) $(CARGO) bench -p backdoors-tests --bench failover
	NOSB=$$(images/kernel/build.sh --variant nosb | tail -n 1) && \
	BD_IMAGES_ENV=$(IMAGES_ENV) BD_KERNEL_NOSB_BZIMAGE=$$NOSB/bzImage \
	$(CARGO) bench -p backdoors-tests --bench sb_cost

# The paper's evaluation as figures (docs/evaluation.md): Figures 2 and 3 with the baselines
# (tests/benches/experiments.rs), Table 1 and the monitor's CPU use (tests/benches/bdmon.rs), and
# redis's latency through an attack (tests/benches/service.rs), as CSV, SVG and PNG in
# docs/figures. About 25 minutes for tcg and 45 more for kvm on this 2-core machine (measured in
# docs/evaluation.md); EXPERIMENTS_ENGINES=tcg for tcg alone.
EXPERIMENTS_ENGINES ?= tcg,kvm
FIGURES := $(CURDIR)/docs/figures
experiments: images release
	BD_IMAGES_ENV=$(IMAGES_ENV) $(CARGO) bench -p backdoors-tests --bench experiments -- \
		--engines $(EXPERIMENTS_ENGINES) --out $(FIGURES)
	BD_IMAGES_ENV=$(IMAGES_ENV) $(CARGO) bench -p backdoors-tests --bench bdmon -- \
		--engines $(EXPERIMENTS_ENGINES) --rounds 3 --periods 0,1,2,5,10,20,50,100 --csv $(FIGURES)
	BD_IMAGES_ENV=$(IMAGES_ENV) $(CARGO) bench -p backdoors-tests --bench service -- \
		--engines $(EXPERIMENTS_ENGINES) --attacks cpu,mem --csv-dir $(FIGURES)
	/usr/bin/python3 scripts/plot_experiments.py $(FIGURES)

# One bdmon and many guests (issue 18): the instructions of one sample (callgrind, two runs of
# K samples; the difference divided by the difference of K, so setup cancels out), then one real
# bdmon against SCALE_GUESTS memory-image bridges for SCALE_SECONDS. Figures in docs/benchmarks.md.
SCALE_GUESTS ?= 100,1000
SCALE_PERIOD_MS ?= 10
SCALE_SECONDS ?= 10
scale: release
	$(CARGO) bench -p backdoors-tests --bench scale --no-run
	cd tests && B=$$(ls -t ../target/release/deps/scale-* | grep -v '\.d$$' | head -n 1) && \
	for k in 200 400; do \
		valgrind --tool=callgrind --callgrind-out-file=/tmp/bd-scale-cg.$$k $$B --per-sample $$k \
			2>&1 | grep -E 'Collected'; \
	done
	$(CARGO) bench -p backdoors-tests --bench scale -- --guests $(SCALE_GUESTS) \
		--period-ms $(SCALE_PERIOD_MS) --seconds $(SCALE_SECONDS)

# A short run of every cargo-fuzz target (introspect: guest data; rdma-bridge: the wire format).
# cargo-fuzz runs on the stable toolchain with -s none (no sanitizer; panics and hangs are found).
FUZZ_SECONDS ?= 20
FUZZ_CRATES := introspect rdma-bridge
fuzz:
	command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	for c in $(FUZZ_CRATES); do \
		(cd $$c && $(CARGO) fuzz build -s none) || exit 1; \
		for t in $$(cd $$c && $(CARGO) fuzz list); do \
			(cd $$c && $(CARGO) fuzz run -s none $$t -- -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048) || exit 1; \
		done; \
	done

# Boots a guest under bdvmm and runs a bounded fork bomb next to a "useful" program.
demo: images release
	DEMO_ENGINE=$(ENGINE) scripts/demo.sh

clean-cache:
	rm -rf $(CACHE)
