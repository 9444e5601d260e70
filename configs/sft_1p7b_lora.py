"""LoRA instruction tuning of the 1.7B model, as the final version of the DMaS-LLaMa-Lite paper
describes it: LoRA adapters, yahma/alpaca-cleaned, the Vicuna 1.1 template, every answer ended by
<|endoftext|>. The paper publishes no LoRA hyperparameters; the choices below are stated where they
are made. The base is frozen and held in bf16 (3.4 GB), so one 24 GB card is enough. Everything
else is configs/sft_1p7b.py's, so the two runs differ only in what the adapters need.

    python finetune.py --config configs/sft_1p7b_lora.py                          # one GPU
    torchrun --standalone --nproc_per_node=8 finetune.py --config configs/sft_1p7b_lora.py
    python finetune.py --config configs/sft_1p7b_lora.py --data=alpaca.jsonl     # a local copy, offline
    python export_hf.py --checkpoint out/sft_1p7b_lora --out hf_merged           # the merged model
    python export_hf.py --checkpoint out/sft_1p7b_lora --out hf_adapter --adapter  # the PEFT adapter

Memory on one GPU: frozen base 1.72B x 2 bytes = 3.4 GB; adapters (rank 16 on all seven
projections: 36 layers x 16 x (wq 2048+2048, wk and wv 2048+512 each, wo 2048+2048, w1 w2 w3
2048+5120 each) = 20.1M parameters) with their float32 gradients and AdamW moments: 16 bytes each,
0.32 GB; activations at micro-batch 4 x 1,024 tokens for backward through all 36 blocks. plan.py
projects the whole (not measured):

    python plan.py --config configs/sft_1p7b_lora.py --gpu_mem 24 --peak_tflops 165
    ->  DDP, no checkpointing, micro-batch 4: peak 13.9 GiB, fits (micro-batch 8: 23.1 GiB, does not
        with 2 GiB kept for the CUDA context; with --activation_checkpointing=full, 6.2 GiB)
"""

import dataclasses
from pathlib import Path

from llama_fineweb.train_config import SFTConfig, load_config_file


def config() -> SFTConfig:
    full_tuning = load_config_file(str(Path(__file__).with_name("sft_1p7b.py")), SFTConfig)
    return dataclasses.replace(
        full_tuning,
        # Not published. Rank 16 and alpha 32 (scale 2) on all seven projections: QLoRA (Dettmers et
        # al., 2023) found adapters on every linear layer needed to match full fine-tuning on
        # instruction data, where alpaca-lora's q/v-only default falls short; rank matters little.
        lora_rank=16,
        lora_alpha=32.0,
        lora_dropout=0.05,  # alpaca-lora's and QLoRA's value for models of this size
        lora_targets="wq,wk,wv,wo,w1,w2,w3",
        # sft_1p7b.py's 128 examples per step (131,072 tokens / 1,024), in smaller micro-batches:
        #   4 micro-batch x 32 accumulation steps x 1 GPU (x 4 x 8 GPUs)
        micro_batch=4,
        # alpaca-lora's: adapters start at zero and need a far larger step than full tuning's 2e-5
        max_lr=3e-4,
        beta2=0.999,  # the adapters' AdamW state is float32 and tiny: no need to shorten its memory
        out_dir="out/sft_1p7b_lora",
        keep_last=3,  # each checkpoint holds the adapters and their AdamW moments: ~240 MB
    )
