"""Instruction tuning on CPU, offline, in a few minutes: the tiny base model on 24 examples.

    python train_llama.py --config configs/tiny.py       # the base model, out/tiny (~300 steps)
    python finetune.py --config configs/sft_tiny.py      # -> out/sft_tiny
    python chat.py --checkpoint out/sft_tiny --prompt "Name a primary color." --temperature 0

The 24 examples (tests/data/alpaca_tiny.json, alpaca form) are too few to teach a 6.6M-parameter
model anything general: it learns the format and memorizes the 22 training answers ("Red is a
primary color."), while the validation loss on the 2 held-out rows stays high. That is what a
demo of the pipeline needs to show. About 3 minutes on 2 CPU cores.
"""

from llama_fineweb.chat_template import TEMPLATES
from llama_fineweb.train_config import SFTConfig


def config() -> SFTConfig:
    return SFTConfig(
        model="tiny",
        init_from="out/tiny",  # train_llama.py --config configs/tiny.py writes it
        data="tests/data/alpaca_tiny.json",
        template="vicuna",
        val_fraction=0.1,  # 2 of the 24 rows held out, 22 to train on
        seq_len=128,  # the longest example is 61 tokens in the Vicuna template
        pad_multiple=64,
        # 8 examples per step = total_batch_tokens / seq_len = 1,024 / 128
        #   = 8 micro-batch x 1 accumulation step x 1 process
        total_batch_tokens=1024,
        micro_batch=8,
        max_steps=200,  # 200 x 8 / 22 = ~73 epochs: the training loss ends near 0.06
        warmup_steps=10,
        max_lr=3e-3,  # high, as for pretraining the tiny model: memorizing is the point here
        min_lr=3e-4,
        weight_decay=0.0,
        eval_interval=25,
        sample_interval=50,
        sample_prompt=TEMPLATES["vicuna"].render([{"role": "user", "content": "Name a primary color."}],
                                                 add_generation_prompt=True),
        sample_tokens=16,
        out_dir="out/sft_tiny",
        save_interval=50,
        device="cpu",
    )
