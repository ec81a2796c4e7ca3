# attention.mk - the example models of deploy/gen/gen_attention.py are
# regenerated when that generator changes (gen_models.py runs every module).
$(MODELS)/.generated: deploy/gen/gen_attention.py
