"""A 124M-parameter LLaMa on FineWeb-Edu: a quick sanity run on one GPU or a node."""

from llama_fineweb.train_config import TrainConfig


def config() -> TrainConfig:
    return TrainConfig(
        model="124m",
        data_dir="data/edu_fineweb10B",
        seq_len=1024,
        # 32 sequences x 1024 tokens x 16 accumulation steps x 1 GPU = 524,288 tokens per step;
        # on 8 GPUs the accumulation drops to 2 and each step sees the same sequences.
        total_batch_tokens=524_288,
        micro_batch=32,
        max_steps=19_073,  # 19,073 x 524,288 = 10.0B tokens, one pass over sample-10BT
        warmup_steps=715,
        max_lr=6e-4,
        min_lr=6e-5,
        eval_interval=250,
        hellaswag_interval=1000,
        out_dir="out/llama_124m",
        save_interval=1000,
    )
