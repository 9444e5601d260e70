"""Instruction tuning of the 1.7B model as the DMaS-LLaMa-Lite authors did for their
step-43.5k-instruct release: yahma/alpaca-cleaned, the Vicuna 1.1 template, every answer ended by
<|endoftext|>. They published no hyperparameters; these are the Stanford Alpaca recipe's (full
fine-tuning, lr 2e-5 cosine with 3% warmup, 3 epochs, 128 examples per step, no weight decay),
which was made for this data at this scale.

    torchrun --standalone --nproc_per_node=8 finetune.py --config configs/sft_1p7b.py
    python finetune.py --config configs/sft_1p7b.py --init_from=path/to/DMaS-LLaMa-Lite-step-43.5k
    python finetune.py --config configs/sft_1p7b.py --data=alpaca.jsonl    # a local copy, offline
"""

from llama_fineweb.chat_template import TEMPLATES
from llama_fineweb.train_config import SFTConfig


def config() -> SFTConfig:
    return SFTConfig(
        model="1p7b",
        init_from="out/llama_1p7b",  # our pretraining run, or a Hugging Face Llama directory
        data="yahma/alpaca-cleaned",  # ~51.8k rows (instruction, input, output)
        template="vicuna",
        val_fraction=0.02,  # ~1,035 rows held out: a validation loss worth plotting
        overlong="drop",  # the few examples over 1,025 tokens; the log counts them
        seq_len=1024,  # the pretraining context; alpaca examples average ~250 tokens
        pad_multiple=64,  # at most 16 padded lengths, so compile settles after a few steps
        # 128 examples per step = total_batch_tokens / seq_len = 131,072 / 1,024
        #   = 16 micro-batch x 1 accumulation step x 8 GPUs (8 steps on 1 GPU, 2 on 4)
        total_batch_tokens=128 * 1024,
        micro_batch=16,  # what pretraining fits on an 80 GB GPU; use 4 on a 48 GB card
        # 3 epochs: ~50.7k train examples / 128 = ~396 steps per epoch -> max_steps ~1,189
        epochs=3,
        warmup_steps=36,  # ~3% of the steps
        max_lr=2e-5,  # small: full fine-tuning should adapt the model, not overwrite what it knows
        min_lr=0.0,  # cosine to zero, as in the Alpaca recipe
        weight_decay=0.0,
        beta1=0.9,
        beta2=0.95,  # pretraining's: the shorter second-moment memory is the safer one in bf16
        grad_clip=1.0,
        eval_interval=100,
        sample_interval=200,
        sample_prompt=TEMPLATES["vicuna"].render(
            [{"role": "user", "content": "Give three tips for staying healthy."}], add_generation_prompt=True),
        sample_tokens=96,
        out_dir="out/sft_1p7b",
        save_interval=200,
        keep_last=2,  # each checkpoint holds fp32 weights and two AdamW moments: 12 B x 1.72B = ~21 GB
    )
