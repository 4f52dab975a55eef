# Two commands on a fresh machine:  `make run` (the main job on the embedded default) and `make test`.
VENV ?= .venv
STAMP := $(VENV)/.installed
# GPU machines: one rank per GPU. CPU machines: DeepSpeed's CPU accelerator with $(CPU_RANKS) ranks.
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
CPU_RANKS ?= 2
LAUNCH := $(if $(HAS_GPU),$(VENV)/bin/deepspeed,DS_ACCELERATOR=cpu $(VENV)/bin/deepspeed --num_gpus $(CPU_RANKS))
# Run flags (`make run ARGS="--method gorp,o-lora"`) and launcher options
# (`make run LAUNCH_ARGS="--master_port 29617"`) go to different programs, so they are kept apart.
ARGS ?=
LAUNCH_ARGS ?=

.PHONY: install run test lint
install: $(STAMP)
$(STAMP): pyproject.toml scripts/install.sh
	bash scripts/install.sh
	touch $(STAMP)

run: $(STAMP)
	$(LAUNCH) $(LAUNCH_ARGS) launch/train.py --ds_config ds_configs/zero2.json $(ARGS)

test: $(STAMP)
	DS_ACCELERATOR=$(if $(HAS_GPU),cuda,cpu) $(VENV)/bin/python -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check gorp_ds launch tests bench scripts
