# The two quick-start commands of the README are `make demo` and `make test`.
.PHONY: setup demo test reliability-report loss-demo compare bench

setup:
	bash tools/bootstrap.sh

# Build the embedded corpus, pre-train the tiny model through NeMo-Run (torchrun, TP=2, CPU/gloo
# without a GPU), export it to Hugging Face format and print a summary.
demo: setup
	.venv/bin/python -m run_configs.main_job --out outputs/main

test: setup
	.venv/bin/python -m pytest -q tests

# Rerun the fault-injection and bad-input tests and rewrite docs/reliability.md from their figures.
reliability-report: setup
	RELIABILITY_REPORT=docs/reliability.md .venv/bin/python -m pytest -q tests/test_reliability.py \
		tests/test_data_validation.py tests/test_config_errors.py

# The five loss presets side by side on a byte-level bigram model (10-30 s; first run compiles kernels).
loss-demo: setup
	.venv/bin/python -m megatron_ext.demo

# The five presets side by side on the tiny recipe, with a table and a plot (needs `make demo`;
# replaces an earlier outputs/compare).
compare: setup
	.venv/bin/python -m run_configs compare --data-dir outputs/main/corpus --out outputs/compare --overwrite

bench: setup
	.venv/bin/python tools/bench_loss.py
	.venv/bin/python tools/bench_train.py
