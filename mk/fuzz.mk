# mk/fuzz.mk - reliability targets: libFuzzer fuzzing, the soak run, valgrind.
#
#   make fuzz                  build every tests/fuzz/fuzz_*.c into build-fuzz/
#   make fuzz-run SECONDS=N    run each target N seconds on a scratch copy of
#                              its seed corpus (tests/fuzz/corpus/<target>/);
#                              prints executions and corpus size per target;
#                              a crash fails the run and leaves the input in
#                              build-fuzz/artifacts/<target>/
#   make soak [SOAK_REQUESTS=N]  tests/soak/run.sh: loadgen against a daemon
#   make memcheck              the integration suite under valgrind
#
# The daemon library is compiled again with clang and
# -fsanitize=fuzzer-no-link,address,undefined (coverage for libFuzzer, ASan and
# UBSan everywhere); each target links with -fsanitize=fuzzer.

FUZZ_BUILD := build-fuzz
FUZZ_CC ?= clang
FUZZ_SAN := -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer
FUZZ_CFLAGS := -O1 -g -std=c11 -D_GNU_SOURCE -Wall -Wextra -fno-strict-aliasing -pthread \
               -DTALLYD_VERSION='"$(VERSION)"' $(FUZZ_SAN)
FUZZ_LIB_SRC := $(filter-out %.cu,$(LIB_SRC))
FUZZ_LIB_OBJ := $(FUZZ_LIB_SRC:%.c=$(FUZZ_BUILD)/%.o)
FUZZ_SRC := $(wildcard tests/fuzz/fuzz_*.c)
FUZZ_NAMES := $(patsubst tests/fuzz/fuzz_%.c,%,$(FUZZ_SRC))
FUZZ_BIN := $(FUZZ_NAMES:%=$(FUZZ_BUILD)/fuzz_%)
FUZZ_ARGS ?= -rss_limit_mb=2048 -timeout=20 -print_final_stats=1

ifeq ($(ARCH),x86_64)
$(FUZZ_BUILD)/%_avx2.o: FUZZ_ARCH := $(AVX2_FLAGS)
$(FUZZ_BUILD)/%_avx512.o: FUZZ_ARCH := $(AVX512_FLAGS)
endif

$(FUZZ_BUILD)/%.o: %.c
	@mkdir -p $(dir $@)
	$(FUZZ_CC) $(CPPFLAGS) $(FUZZ_CFLAGS) $(FUZZ_ARCH) -fsanitize=fuzzer-no-link -MMD -MP -c $< -o $@

$(FUZZ_BUILD)/libtallyd.a: $(FUZZ_LIB_OBJ)
	@rm -f $@
	ar rcs $@ $^

$(FUZZ_BUILD)/fuzz_%: tests/fuzz/fuzz_%.c tests/fuzz/fuzz_common.h $(FUZZ_BUILD)/libtallyd.a
	$(FUZZ_CC) $(CPPFLAGS) $(FUZZ_CFLAGS) -fsanitize=fuzzer -o $@ $< $(FUZZ_BUILD)/libtallyd.a $(LDLIBS)

fuzz: $(FUZZ_BIN)

# Each target runs on a scratch copy of its corpus, so the repository is
# never modified; the stats line libFuzzer prints at exit gives the count.
fuzz-run: fuzz
	@set -e; fail=0; \
	printf '%-12s %12s %10s %8s\n' target executions exec/s corpus; \
	for t in $(FUZZ_NAMES); do \
	  scratch=$$(mktemp -d /tmp/tallyd-fuzz-$$t-XXXXXX); \
	  if [ -d tests/fuzz/corpus/$$t ]; then cp -r tests/fuzz/corpus/$$t/. $$scratch/; fi; \
	  mkdir -p $(FUZZ_BUILD)/artifacts/$$t; \
	  log=$(FUZZ_BUILD)/fuzz-$$t.log; \
	  dict=; [ -f tests/fuzz/$$t.dict ] && dict=-dict=tests/fuzz/$$t.dict; \
	  if ASAN_OPTIONS=$${ASAN_OPTIONS:-detect_leaks=1} UBSAN_OPTIONS=print_stacktrace=1 \
	     $(FUZZ_BUILD)/fuzz_$$t $(FUZZ_ARGS) $$dict -max_total_time=$(SECONDS) \
	       -artifact_prefix=$(FUZZ_BUILD)/artifacts/$$t/ $$scratch >$$log 2>&1; then \
	    st=ok; else st=FAILED; fail=1; fi; \
	  execs=$$(sed -n 's/^stat::number_of_executed_units: *//p' $$log | tail -1); \
	  speed=$$(sed -n 's/^stat::average_exec_per_sec: *//p' $$log | tail -1); \
	  printf '%-12s %12s %10s %8s %s\n' $$t "$${execs:-?}" "$${speed:-?}" \
	    "$$(ls $$scratch | wc -l)" $$st; \
	  if [ $$st = FAILED ]; then tail -40 $$log; \
	    echo "crash input kept in $(FUZZ_BUILD)/artifacts/$$t/; copy it to tests/fuzz/regressions/$$t/"; fi; \
	  rm -rf $$scratch; \
	done; exit $$fail

SOAK_REQUESTS ?= 1000000
soak: $(BUILD)/tallyd $(BUILD)/tests/tools/loadgen models
	@BUILD=$(BUILD) PYTHON=$(PYTHON) SOAK_REQUESTS=$(SOAK_REQUESTS) bash tests/soak/run.sh

memcheck: $(BUILD)/tallyd models
	@BUILD=$(BUILD) PYTHON=$(PYTHON) bash tests/soak/memcheck.sh

-include $(shell find $(FUZZ_BUILD) -name '*.d' 2>/dev/null)
