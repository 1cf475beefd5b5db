# The two quick-start commands of the README: `make demo` and `make test`.
.PHONY: setup demo test bench

setup:
	bash tools/bootstrap.sh

demo: setup
	.venv/bin/python -m megatron_ext.demo

test: setup
	.venv/bin/python -m pytest -q tests

bench: setup
	.venv/bin/python tools/bench_loss.py
