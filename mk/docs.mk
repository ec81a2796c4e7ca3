# mk/docs.mk - documentation upkeep and the example repository's reset,
# included by the Makefile.
#
#   make docs           rewrite the flag tables of README.md and docs/ from tallyd --help
#   make reset-models   back to the shipped example versions: every version
#                       directory under $(MODELS) (fitted or calibrated ones
#                       included) is removed and the generator writes version 1
#                       of each again; a running tallyd follows at its next
#                       SIGHUP or repository poll (or restart `make run`)

.PHONY: docs reset-models

docs: $(BUILD)/tallyd
	$(PYTHON) docs/tools/flags.py --tallyd $(BUILD)/tallyd

reset-models:
	rm -rf $(MODELS)/*/[0-9]*/ $(MODELS)/*/.rowlog/ $(MODELS)/.generated
	$(PYTHON) deploy/gen_models.py $(MODELS)
	@touch $(MODELS)/.generated
