# Two commands take a fresh machine to a result; each installs what it needs first.
PYTHON ?= python3

.PHONY: install test demo

install:
	$(PYTHON) -m pip install -q -r requirements.txt

test: install
	$(PYTHON) -m pytest -q

demo: install
	$(PYTHON) train_llama.py --config configs/tiny.py
