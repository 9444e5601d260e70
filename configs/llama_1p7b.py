"""The DMaS-LLaMa-Lite run: the paper's 1.7B LLaMa on ~20B FineWeb-Edu tokens."""

from llama_fineweb.train_config import TrainConfig


def config() -> TrainConfig:
    return TrainConfig(
        model="1p7b",  # 36 layers, dim 2048, 32 heads, 8 KV heads, FFN 5120: 1,716,144,128 params
        data_dir="data/edu_fineweb100B",  # 20B tokens need sample-100BT (sample-10BT is 10B)
        seq_len=1024,
        # 16 sequences x 1024 tokens x 4 accumulation steps x 8 GPUs = 524,288 tokens per step;
        # the accumulation follows the GPU count: 32 steps on 1 GPU, 8 on 4, 4 on 8.
        total_batch_tokens=524_288,
        micro_batch=16,  # fits an 80 GB GPU in bf16 with the chunked loss
        max_steps=38_147,  # 38,147 x 524,288 = 20.0B tokens
        warmup_steps=715,
        max_lr=6e-4,
        min_lr=6e-5,
        weight_decay=0.1,
        grad_clip=1.0,
        eval_interval=250,
        val_sequences=640,
        hellaswag_interval=1000,
        sample_interval=1000,
        out_dir="out/llama_1p7b",
        save_interval=500,
        keep_last=3,
    )
