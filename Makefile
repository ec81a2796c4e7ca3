# tallyd - build, test and serve.
#
#   make run     install what is missing, build, serve deploy/models on
#                127.0.0.1:8000 (LISTEN=0.0.0.0:9000 MODELS=/srv/models to change)
#   make test    install what is missing, build, run every test
#   make image   build the container image with buildah (IMAGE=, BASE_IMAGE=)
#   make SAN=1   build with AddressSanitizer + UndefinedBehaviorSanitizer (and TS_ASSERT on)
#   make DEBUG=1 TS_ASSERT invariants on (base/check.h), without sanitizers
#   make CUDA=1  also build the CUDA attention kernels (needs nvcc)
#
# Sources are found by wildcard: a new daemon/<floor>/*.c or tests/unit/test_*.c
# needs no edit here. Files named *_avx2.c are compiled for AVX2+FMA only,
# *_avx512.c for AVX-512 F/VL/BW/DQ (chosen at run time, never
# -march=native); *_neon.c hold AArch64 code.

PREFIX ?= /usr/local
DESTDIR ?=
SAN ?=
CUDA ?=
BUILD ?= build$(if $(SAN),-san)$(if $(CUDA),-cuda)
PYTHON ?= $(shell test -x /usr/bin/python3 && echo /usr/bin/python3 || echo python3)
LISTEN ?= 127.0.0.1:8000
MODELS ?= deploy/models
SECONDS ?= 10

PKGS := libmicrohttpd jansson libuv openssl zlib libpcre2-8 libcurl
ARCH := $(shell uname -m)
VERSION := $(shell cat VERSION 2>/dev/null || echo 0.0.0)

CFLAGS ?= -O2 -g
CFLAGS += -std=c11 -D_GNU_SOURCE -Wall -Wextra -fno-strict-aliasing -pthread -fPIC \
          -DTALLYD_VERSION='"$(VERSION)"'
CPPFLAGS += $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
LDLIBS += $(shell pkg-config --libs $(PKGS) 2>/dev/null) -lm -lpthread
ifneq ($(SAN)$(DEBUG),)
CFLAGS += -DTALLYD_DEBUG
endif
ifneq ($(SAN),)
CFLAGS += -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined
LDFLAGS += -fsanitize=address,undefined
endif
ifneq ($(WERROR),)
CFLAGS += -Werror
endif

LIB_SRC := $(filter-out daemon/server/main.c,$(wildcard daemon/*/*.c))
LIB_OBJ := $(LIB_SRC:%.c=$(BUILD)/%.o)
ifneq ($(CUDA),)
CU_SRC := $(wildcard daemon/*/*.cu)
LIB_OBJ += $(CU_SRC:%.cu=$(BUILD)/%.cu.o)
CFLAGS += -DTALLYD_CUDA=1
# The toolkit root and libcudart's folder come from deploy/cuda_home.sh (asks
# nvcc itself, so a wrapper on PATH works); both can be given by hand.
CUDA_FOUND := $(if $(CUDA_HOME),,$(shell deploy/cuda_home.sh))
CUDA_HOME ?= $(or $(word 1,$(CUDA_FOUND)),/usr/local/cuda)
CUDA_LIBDIR ?= $(or $(word 2,$(CUDA_FOUND)),$(firstword $(patsubst %/,%,$(dir $(wildcard \
  $(CUDA_HOME)/lib64/libcudart.so $(CUDA_HOME)/lib/libcudart.so \
  $(CUDA_HOME)/targets/*/lib/libcudart.so)))),$(CUDA_HOME)/lib64)
LDLIBS += -L$(CUDA_LIBDIR) -Wl,-rpath,$(CUDA_LIBDIR) -lcudart -lstdc++
NVCC := $(CUDA_HOME)/bin/nvcc
NVCCFLAGS ?= -O3 -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90
endif
UNIT_SRC := $(wildcard tests/unit/test_*.c)
UNIT_BIN := $(UNIT_SRC:tests/unit/%.c=$(BUILD)/tests/%)
TOOL_SRC := $(wildcard tests/tools/*.c bench/*.c)
TOOL_BIN := $(patsubst %.c,$(BUILD)/%,$(TOOL_SRC))
CLIENT_SRC := $(wildcard clients/c/*.c)

.PHONY: format format-check all deps deps-run deps-test deps-bench deps-fuzz deps-image image run test unit \
        integration bench clean install models fuzz fuzz-run soak memcheck

all: $(BUILD)/tallyd $(TOOL_BIN) models

# deploy/deps.sh installs only what each use needs, and starts no service.
deps: deps-run
deps-run deps-test deps-bench deps-fuzz deps-image:
	@bash deploy/deps.sh $(@:deps-%=%)

$(BUILD)/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(CPPFLAGS) $(CFLAGS) -MMD -MP -c $< -o $@

# One list of per-path target flags, read by this build and by mk/fuzz.mk's.
AVX2_FLAGS := -mavx2 -mfma
AVX512_FLAGS := -mavx2 -mfma -mavx512f -mavx512vl -mavx512bw -mavx512dq
ifeq ($(ARCH),x86_64)
$(BUILD)/%_avx2.o: CFLAGS += $(AVX2_FLAGS)
$(BUILD)/%_avx512.o: CFLAGS += $(AVX512_FLAGS)
endif

$(BUILD)/%.cu.o: %.cu
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCCFLAGS) -Xcompiler -fPIC -c $< -o $@

$(BUILD)/libtallyd.a: $(LIB_OBJ)
	@rm -f $@
	ar rcs $@ $^

$(BUILD)/tallyd: $(BUILD)/daemon/server/main.o $(BUILD)/libtallyd.a
	$(CC) $(CFLAGS) $(LDFLAGS) -o $@ $^ $(LDLIBS)
	@ln -sf $(notdir $@) $(BUILD)/tallyd-latest 2>/dev/null || true

$(BUILD)/tests/%: tests/unit/%.c $(BUILD)/libtallyd.a
	@mkdir -p $(dir $@)
	$(CC) $(CPPFLAGS) $(CFLAGS) $(LDFLAGS) -o $@ $< $(BUILD)/libtallyd.a $(LDLIBS) -lcmocka

$(BUILD)/tests/tools/%: tests/tools/%.c $(BUILD)/libtallyd.a
	@mkdir -p $(dir $@)
	$(CC) $(CPPFLAGS) $(CFLAGS) $(LDFLAGS) -o $@ $< $(BUILD)/libtallyd.a $(LDLIBS)
# bench_sgemm prints OpenBLAS beside tallyd when libopenblas-dev is there.
ifeq ($(shell pkg-config --exists openblas 2>/dev/null && echo y),y)
$(BUILD)/bench/bench_sgemm: CPPFLAGS += -DTALLYD_OPENBLAS $(shell pkg-config --cflags openblas)
$(BUILD)/bench/bench_sgemm: LDLIBS += $(shell pkg-config --libs openblas)
endif
$(BUILD)/bench/%: bench/%.c $(BUILD)/libtallyd.a
	@mkdir -p $(dir $@)
	$(CC) $(CPPFLAGS) $(CFLAGS) $(LDFLAGS) -o $@ $< $(BUILD)/libtallyd.a $(LDLIBS)

# Example models: weights come from a reproducible generator, never blobs.
models: $(MODELS)/.generated
$(MODELS)/.generated: deploy/gen_models.py $(wildcard deploy/gen/*.py) tests/reference/st.py tests/reference/make_tiny_gpt2.py \
                      $(wildcard deploy/bytelm/config.json deploy/bytelm/1/*)
	$(PYTHON) deploy/gen_models.py $(MODELS)
	@touch $@

run: deps-run all
	$(BUILD)/tallyd --model-repository $(MODELS) --listen $(LISTEN)

unit: $(UNIT_BIN)
test: deps-test all $(UNIT_BIN)
	@BUILD=$(BUILD) PYTHON=$(PYTHON) bash tests/run.sh

bench: deps-bench all
	@BUILD=$(BUILD) PYTHON=$(PYTHON) bash bench/run.sh

# clang, for the libFuzzer targets of mk/fuzz.mk only
fuzz: deps-fuzz

# The container image, built with buildah (no Docker engine needed) FROM a
# Debian 12 base that deploy/base_image.sh makes with debootstrap and keeps
# under build/image. BASE_IMAGE=debian:bookworm-slim uses a registry's instead.
IMAGE ?= localhost/tallyd:$(VERSION)
BASE_IMAGE ?= localhost/debian:bookworm
image: deps-image
	@case "$(BASE_IMAGE)" in localhost/*) BASE_IMAGE=$(BASE_IMAGE) bash deploy/base_image.sh ;; esac
	buildah bud --format docker --isolation chroot --network host --layers \
	  --build-arg BASE=$(BASE_IMAGE) -t $(IMAGE) .
	@buildah images --format '{{.Name}}:{{.Tag}} {{.Size}}' $(IMAGE)

install: $(BUILD)/tallyd
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/share/tallyd
	install -m 0755 $(BUILD)/tallyd $(DESTDIR)$(PREFIX)/bin/tallyd
	cp -r deploy/models $(DESTDIR)$(PREFIX)/share/tallyd/

clean:
	rm -rf build build-san build-cuda build-san-cuda build-fuzz $(MODELS)/.generated

# (build/image holds a Debian root while make image runs: not searched)
-include $(shell find $(BUILD) -path $(BUILD)/image -prune -o -name '*.d' -type f -print 2>/dev/null)
-include mk/*.mk

# One style for the whole tree (.clang-format); .ci/run checks it.
FORMAT_SRC = $(shell git ls-files 'daemon/*.c' 'daemon/*.h' 'tests/unit/*.c' 'tests/fuzz/*.c' \
               'tests/tools/*.c' 'bench/*.c' 'bench/*/*.c' 'clients/c/*.c' 'clients/c/*.h' 2>/dev/null)
format:
	clang-format -i $(FORMAT_SRC)
format-check:
	@bad=$$(for f in $(FORMAT_SRC); do clang-format --dry-run -Werror "$$f" >/dev/null 2>&1 || echo "$$f"; done); \
	if [ -n "$$bad" ]; then echo "not formatted (run make format):"; echo "$$bad"; exit 1; fi; \
	echo "format-check: every C file follows .clang-format"
