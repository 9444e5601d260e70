"""A 300-step CPU run on text from the Python standard library: the whole pipeline, offline."""

from llama_fineweb.train_config import TrainConfig


def config() -> TrainConfig:
    return TrainConfig(
        model="tiny",  # ~6.6M parameters, almost all of them the 50304-token embeddings
        data_dir="data/tiny_stdlib",
        prepare_local_data=True,  # tokenizes the standard library's .py files on first use
        seq_len=128,
        # 8 sequences x 128 tokens x 1 accumulation step x 1 process = 1,024 tokens per step
        total_batch_tokens=1024,
        micro_batch=8,
        max_steps=300,
        warmup_steps=20,
        max_lr=3e-3,
        min_lr=3e-4,
        eval_interval=50,
        val_sequences=64,
        sample_interval=100,
        sample_prompt="def main(",
        sample_tokens=32,
        out_dir="out/tiny",
        save_interval=100,
        device="cpu",
    )
