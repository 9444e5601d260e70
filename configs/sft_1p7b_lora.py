"""LoRA instruction tuning of the 1.7B model, as the final version of the DMaS-LLaMa-Lite paper
describes it: LoRA adapters, yahma/alpaca-cleaned, the Vicuna 1.1 template, every answer ended by
<|endoftext|>. The paper publishes no LoRA hyperparameters; the choices below are stated where they
are made. The base is frozen and held in bf16 (3.4 GB), so one 24 GB card is enough.

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

from llama_fineweb.chat_template import TEMPLATES
from llama_fineweb.train_config import SFTConfig


def config() -> SFTConfig:
    return SFTConfig(
        model="1p7b",
        init_from="out/llama_1p7b",  # our pretraining run, or a Hugging Face Llama directory
        data="yahma/alpaca-cleaned",  # ~51.8k rows (instruction, input, output)
        template="vicuna",
        val_fraction=0.02,
        overlong="drop",
        seq_len=1024,
        pad_multiple=64,
        # Not published. Rank 16 and alpha 32 (scale 2) on all seven projections: QLoRA (Dettmers et
        # al., 2023) found adapters on every linear layer needed to match full fine-tuning on
        # instruction data, where alpaca-lora's q/v-only default falls short; rank matters little.
        lora_rank=16,
        lora_alpha=32.0,
        lora_dropout=0.05,  # alpaca-lora's and QLoRA's value for models of this size
        lora_targets="wq,wk,wv,wo,w1,w2,w3",
        # 128 examples per step, as in sft_1p7b.py: = total_batch_tokens / seq_len = 131,072 / 1,024
        #   = 4 micro-batch x 32 accumulation steps x 1 GPU (x 4 x 8 GPUs)
        total_batch_tokens=128 * 1024,
        micro_batch=4,
        epochs=3,  # alpaca-lora's 3 epochs: ~396 steps each
        warmup_steps=36,  # ~3% of the steps
        max_lr=3e-4,  # alpaca-lora's: adapters start at zero and need a far larger step than full tuning's 2e-5
        min_lr=0.0,
        weight_decay=0.0,
        beta1=0.9,
        beta2=0.999,  # the adapters' AdamW state is float32 and tiny: no reason to shorten its memory
        grad_clip=1.0,
        eval_interval=100,
        sample_interval=200,
        sample_prompt=TEMPLATES["vicuna"].render(
            [{"role": "user", "content": "Give three tips for staying healthy."}], add_generation_prompt=True),
        sample_tokens=96,
        out_dir="out/sft_1p7b_lora",
        save_interval=200,
        keep_last=3,  # each checkpoint holds the adapters and their AdamW moments: ~240 MB
    )
