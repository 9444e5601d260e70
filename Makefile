# Two commands take a fresh machine to a result; each installs what it needs first.
# In a virtual environment, activate it first (source .venv/bin/activate), or pass its interpreter
# (make demo PYTHON=.venv/bin/python) and run the commands that follow with that interpreter too.
PYTHON ?= python3

# The tiny config's own max_steps, named on the command line so that `make demo` on a finished run
# is a note and exit 0, not train_llama.py's "already complete" refusal (docs/resuming.md).
DEMO_STEPS = 300

.PHONY: install test demo

install:
	$(PYTHON) -m pip install -q -r requirements.txt

# Two pytest-xdist workers: 512 tests in 11 min 56 s on 2 cores, against 15 min 53 s for 507 in one process.
test: install
	$(PYTHON) -m pytest -q -n 2

demo: install
	$(PYTHON) train_llama.py --config configs/tiny.py --max_steps=$(DEMO_STEPS)
	@echo ""
	@echo "The tiny model is in out/tiny. Next:"
	@echo "  $(PYTHON) metrics.py out/tiny                      # loss, LR, throughput -> out/tiny/metrics.png"
	@echo "  $(PYTHON) finetune.py --config configs/sft_tiny.py # instruction-tune it -> out/sft_tiny"
	@echo "  $(PYTHON) chat.py --checkpoint out/sft_tiny --prompt 'Name a primary color.' --temperature 0"
	@echo "To train it again from step 0 (the old checkpoints move to out/tiny/archive_<time>/):"
	@echo "  $(PYTHON) train_llama.py --config configs/tiny.py --resume=never --start_over=archive"
