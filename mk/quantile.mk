# mk/quantile.mk - regenerate the example models when the quantile example
# generator changes (the stamp otherwise depends on deploy/gen_models.py only).
$(MODELS)/.generated: deploy/gen/gen_quantile.py
