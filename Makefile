# Convenience wrappers around dev.py (which needs only Python and pip).
.PHONY: demo test setup bench
demo:
	python3 dev.py demo
test:
	python3 dev.py test
setup:
	python3 dev.py setup
bench: setup
	.venv/bin/python bench/eval_path.py
	.venv/bin/python bench/fit_curve.py
