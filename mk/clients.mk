# mk/clients.mk - the client library (build/libtally.a) and its command-line
# tool (build/tallyctl), included by the Makefile. They link libcurl for HTTP,
# jansson for JSON and OpenSSL's libcrypto for `tallyctl keygen`.

CLIENT_PKGS := libcurl jansson libcrypto
CLIENT_CFLAGS := $(shell pkg-config --cflags $(CLIENT_PKGS) 2>/dev/null)
CLIENT_LIBS := $(shell pkg-config --libs $(CLIENT_PKGS) 2>/dev/null || echo -lcurl -ljansson -lcrypto) -lm -lpthread

.PHONY: clients
clients: $(BUILD)/libtally.a $(BUILD)/tallyctl
all: $(BUILD)/tallyctl
test: $(BUILD)/tallyctl

$(BUILD)/clients/c/%.o: clients/c/%.c clients/c/tally.h
	@mkdir -p $(dir $@)
	$(CC) $(CLIENT_CFLAGS) $(CFLAGS) -MMD -MP -c $< -o $@

$(BUILD)/libtally.a: $(BUILD)/clients/c/tally.o
	@rm -f $@
	ar rcs $@ $^

$(BUILD)/tallyctl: $(BUILD)/clients/c/tallyctl.o $(BUILD)/libtally.a
	$(CC) $(CFLAGS) $(LDFLAGS) -o $@ $^ $(CLIENT_LIBS)

# `make install` also installs the client: the tool, the library and its header.
.PHONY: install-clients
install: install-clients
install-clients: $(BUILD)/tallyctl $(BUILD)/libtally.a
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/lib $(DESTDIR)$(PREFIX)/include
	install -m 0755 $(BUILD)/tallyctl $(DESTDIR)$(PREFIX)/bin/tallyctl
	install -m 0644 $(BUILD)/libtally.a $(DESTDIR)$(PREFIX)/lib/libtally.a
	install -m 0644 clients/c/tally.h $(DESTDIR)$(PREFIX)/include/tally.h
