# Two entry points for a fresh clone: `make demo` and `make test`. Both create/reuse .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test setup clean corpus corpus-packages browser-packages rl-packages mcp-servers

setup: $(STAMP) browser-packages rl-packages mcp-servers

# torch first and pinned: the CPU build lies on local disk; a bare `torch` would pull a CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/minicpm4 demo

test: $(STAMP) browser-packages rl-packages mcp-servers
	$(PY) -m pytest -q

# The chat-page test drives the system's Chromium through chromedriver (tests/server/test_server_browser.py).
# Installed when missing; a failed install is only a warning: that one test then skips, saying why.
BROWSER_PACKAGES := chromium chromium-driver
browser-packages:
	@missing=$$(for p in $(BROWSER_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing (for the chat-page browser test):" $$missing; \
		sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$sudo apt-get install -y --no-install-recommends $$missing \
			|| { $$sudo apt-get update -q && $$sudo apt-get install -y --no-install-recommends $$missing; } \
			|| echo "warning: could not install $$missing; the browser test will skip"; \
	fi

# RL code rewards run model-written code under bubblewrap (minicpm4/train/rl/sandbox.py). Installed when missing;
# a failed install is only a warning: the sandbox tests then skip and code rewards refuse to run, saying why.
RL_PACKAGES := bubblewrap
rl-packages:
	@missing=$$(for p in $(RL_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing (for the RL code sandbox):" $$missing; \
		sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$sudo apt-get install -y --no-install-recommends $$missing \
			|| { $$sudo apt-get update -q && $$sudo apt-get install -y --no-install-recommends $$missing; } \
			|| echo "warning: could not install $$missing; the sandbox tests will skip"; \
	fi

# Third-party MCP servers from PyPI for `minicpm4 mcp` and its tests (tests/apps/test_mcp_*.py), in their own
# venv as any MCP server runs (uvx, Docker): mcp-server-calculator 0.2.1 needs the 1.x SDK (`mcp<2`), our host uses
# 2.x. A failed install is only a warning: those tests then skip, saying why.
MCP_SERVERS := build/mcp-servers
mcp-servers: $(MCP_SERVERS)/.installed
$(MCP_SERVERS)/.installed:
	@$(PYTHON) -m venv $(MCP_SERVERS) && $(MCP_SERVERS)/bin/pip install -q "mcp<2" mcp-server-time \
		"mcp-server-calculator>=0.2.1" && touch $@ \
		|| echo "warning: could not install the MCP servers into $(MCP_SERVERS); their tests will skip"

clean:
	rm -rf $(VENV) .pytest_cache $(MCP_SERVERS)

# ---- data: `make corpus` builds the offline corpus, tokenizer, token shards and SFT set under build/data/ ----
# Sources are Debian text packages (licences: minicpm4/data/corpus.py). Each step runs only when its output
# is missing: `rm -rf build/data` rebuilds all (about 8 minutes on 2 CPU cores).
DATA ?= build/data
MINICPM4 := $(VENV)/bin/minicpm4
CORPUS_PACKAGES := wordnet-base dict-gcide dict-foldoc dict-jargon dict-vera dict-devil bible-kjv-text bible-kjv \
	fortunes fortune-mod

corpus: $(DATA)/shards/meta.json $(DATA)/sft/stats.json

corpus-packages:
	@missing=$$(for p in $(CORPUS_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing:" $$missing; \
		$$([ "$$(id -u)" = 0 ] || echo sudo) apt-get install -y --no-install-recommends $$missing; \
	fi

$(DATA)/corpus/stats.json: | $(STAMP) corpus-packages
	$(MINICPM4) data build-corpus --out $(DATA)/corpus

$(DATA)/tokenizer/tokenizer.json: $(DATA)/corpus/stats.json
	$(MINICPM4) tokenizer train --corpus $(DATA)/corpus --vocab-size 8192 --out $(DATA)/tokenizer

$(DATA)/shards/meta.json: $(DATA)/tokenizer/tokenizer.json
	$(MINICPM4) data shards --corpus $(DATA)/corpus --tokenizer $(DATA)/tokenizer --out $(DATA)/shards

$(DATA)/sft/stats.json: $(DATA)/tokenizer/tokenizer.json | corpus-packages
	$(MINICPM4) data build-sft --corpus $(DATA)/corpus --tokenizer $(DATA)/tokenizer --out $(DATA)/sft

# ---- the bundled default model: `make default-model` reruns the whole recipe (MODEL_CARD in the asset folder) ----
# pretrain (muP + WSD + MTP) -> long context (4,096 tokens, InfLLM v2 sparse attention on) -> SFT -> package +
# evaluate. Every stage resumes from its last checkpoint if interrupted (rerun the same command).
# The shipped model's pretrain first ran 200 steps (decay 20); it was then continued from its step-180 checkpoint
# (still in the stable phase, so the LR was unchanged) to the 600 steps below: WSD makes a run extendable.
RUN ?= runs/default
DEFAULT_MODEL := minicpm4/assets/default-model
resume = $$([ -e $(1)/checkpoints/latest ] && echo --resume)
# the report's 32K-stage proportions scaled to 4K: (topk 8 x 64 + window 256) / 4,096 = 19% of the keys, as
# (64 x 64 + 2,048) / 32,768; dense below a quarter of the length
LONG_SPARSE := '{"window_size": 256, "topk": 8, "dense_len": 1024}'
# The corpus has no documents near 4K tokens (entries, chapters): the long stage lets attention cross the
# packed documents, which follow each other in corpus order (Bible chapters in sequence, dictionaries
# alphabetically), so a 4K window is contiguous text with real long-range structure.

.PHONY: default-model default-model-long
default-model: $(DEFAULT_MODEL)/eval.json
default-model-long: $(RUN)/long/final/config.json

$(RUN)/pretrain/final/config.json: | $(DATA)/shards/meta.json
	$(MINICPM4) train pretrain --data $(DATA)/shards --model-config configs/default-model.json --out $(RUN)/pretrain \
		--tokenizer $(DATA)/tokenizer --steps 600 --batch-size 16 --seq-len 256 --lr 5e-3 --warmup 10 --decay 60 \
		--eval-every 100 --save-every 20 --no-progress $(call resume,$(RUN)/pretrain)

$(RUN)/long/final/config.json: $(RUN)/pretrain/final/config.json
	$(MINICPM4) train long --init $(RUN)/pretrain/final --data $(DATA)/shards --out $(RUN)/long --seq-len 4096 \
		--sparse-config $(LONG_SPARSE) --no-document-mask --steps 30 --batch-size 4 --lr 2e-3 --warmup 3 --decay 10 \
		--eval-every 15 --save-every 3 --no-progress $(call resume,$(RUN)/long)

$(RUN)/sft/final/config.json: $(RUN)/long/final/config.json $(DATA)/sft/stats.json
	$(MINICPM4) train sft --init $(RUN)/long/final --data $(DATA)/sft/train.jsonl --val-data $(DATA)/sft/heldout.jsonl \
		--out $(RUN)/sft --steps 150 --batch-size 16 --seq-len 256 --lr 3e-3 --eval-every 40 --save-every 10 \
		--no-progress $(call resume,$(RUN)/sft)

$(DEFAULT_MODEL)/eval.json: $(RUN)/sft/final/config.json
	$(PY) -m minicpm4.train.default_model --run $(RUN) --data $(DATA) --out $(DEFAULT_MODEL) --generations 160
	mkdir -p benchmarks/results/default-model  # the loss curves, kept with the results (runs/ is a build output)
	for stage in pretrain long sft; do cp $(RUN)/$$stage/loss.png benchmarks/results/default-model/$$stage-loss.png; done

# ---- the default model's EAGLE-2 draft: `make default-draft` (model card: $(DEFAULT_MODEL)/draft/README.md) ----
# Distilled from the shipped default model (frozen) on the corpus shards + the SFT chat set (minicpm4/train/draft.py).
# fp32: on the 2-core AVX-512 CPU it trains faster than bf16 autocast (2,660 vs 1,370 tokens/s, batch 16 x 256).
# About 25 minutes of steps + ~10 to load the chat set and validate; resumes from its last checkpoint if interrupted.
DEFAULT_DRAFT := $(DEFAULT_MODEL)/draft
DRAFT_ARGS := --steps 600 --batch-size 16 --seq-len 256 --lr 1e-2 --warmup 20 --decay 120 --dtype float32 \
	--eval-every 200 --eval-batches 0 --save-every 50
.PHONY: default-draft
default-draft: $(DEFAULT_DRAFT)/model.safetensors

$(RUN)/draft/final/config.json: | $(DATA)/shards/meta.json $(DATA)/sft/stats.json
	$(MINICPM4) train draft --model $(DEFAULT_MODEL) --data $(DATA)/shards --chat-data $(DATA)/sft/train.jsonl \
		--out $(RUN)/draft $(DRAFT_ARGS) --no-progress $(call resume,$(RUN)/draft)

$(DEFAULT_DRAFT)/model.safetensors: $(RUN)/draft/final/config.json
	mkdir -p $(DEFAULT_DRAFT)
	cp $(RUN)/draft/final/config.json $(RUN)/draft/final/model.safetensors $(DEFAULT_DRAFT)/
	# FR-Spec indexes beside it (freq_{N}.pt, CPM.cu's format, + frspec.json): 200,000 corpus texts, ~30 s
	$(MINICPM4) frspec-index --model $(DEFAULT_MODEL) --corpus $(DATA)/corpus --sizes 1024,2048,4096 \
		--max-lines 200000 --out $(DEFAULT_DRAFT) --quiet

# ---- the bundled tool model: `make tool-model` (model card: minicpm4/assets/tool-model/README.md) ----
# tool-use trajectories through the live servers (minicpm4 mcp synth) -> SFT of the default model -> package +
# MCP metrics before/after (minicpm4/apps/tool_model.py). fp32: this CPU has no native bf16. ~45 min of steps.
TOOL_DATA := build/mcp-sft
TOOL_RUN := runs/tool-sft
TOOL_MODEL := minicpm4/assets/tool-model
MCP_SERVER_FLAGS := --server $(MCP_SERVERS)/bin/mcp-server-time --server $(MCP_SERVERS)/bin/mcp-server-calculator
.PHONY: tool-model
tool-model: $(TOOL_MODEL)/eval.json

$(TOOL_DATA)/stats.json: | $(MCP_SERVERS)/.installed $(DATA)/sft/stats.json
	$(MINICPM4) mcp synth $(MCP_SERVER_FLAGS) --out $(TOOL_DATA) --train 6000 --val 100 --test 200 --drills 20000 \
		--mix-chat $(DATA)/sft/train.jsonl --mix-fraction 0.15 --seed 0

$(TOOL_RUN)/final/config.json: $(TOOL_DATA)/stats.json
	$(MINICPM4) train sft --init $(DEFAULT_MODEL) --data $(TOOL_DATA)/train.jsonl --val-data $(TOOL_DATA)/val.jsonl \
		--out $(TOOL_RUN) --steps 800 --batch-size 8 --seq-len 1024 --lr 5e-3 --warmup 20 --decay 160 \
		--eval-every 50 --save-every 25 --dtype float32 --no-progress $(call resume,$(TOOL_RUN))

$(TOOL_MODEL)/eval.json: $(TOOL_RUN)/final/config.json
	$(PY) -m minicpm4.apps.tool_model --run $(TOOL_RUN) --data $(TOOL_DATA) $(MCP_SERVER_FLAGS) --out $(TOOL_MODEL)
