"""metrics.py: the FLOPs behind MFU, and the log that reports it."""

import torch

from llama_fineweb import metrics
from model import Transformer, model_config
from runs import metric_rows, run_here


def test_flops_per_token_of_1p7b_is_the_hand_count():
    """1p7b at seq 1024: 6 x (1,716,144,128 - 50,304 x 2,048 input embedding) + 12 x 36 x 2,048 x
    1,024 = 10,584,698,880 FLOPs per token (PaLM's accounting, the embedding lookup left out)."""
    with torch.device("meta"):
        model = Transformer(model_config("1p7b"))
    matmul_params = 1_716_144_128 - 50_304 * 2_048
    assert matmul_params == 1_613_121_536
    assert metrics.flops_per_token(model, 1024) == 6 * 1_613_121_536 + 12 * 36 * 2048 * 1024 == 10_584_698_880
    # seq 2048 adds only the attention term
    assert metrics.flops_per_token(model, 2048) - metrics.flops_per_token(model, 1024) == 12 * 36 * 2048 * 1024


def test_logged_mfu_is_tokens_per_s_times_flops_per_token_over_the_peak(tmp_path, data_dir):
    """metrics.jsonl keeps tokens_per_s beside mfu, and mfu = tokens/s x flops_per_token / peak
    (a CPU run gets an MFU only from --peak_tflops)."""
    run_here(tmp_path, data_dir, "--max_steps=2", "--peak_tflops=0.001")
    rows = [r for r in metric_rows(tmp_path) if "loss" in r]
    assert len(rows) == 2
    with torch.device("meta"):
        tiny = Transformer(model_config("tiny", max_seq_len=32))
    for r in rows:
        expected = r["tokens_per_s"] * metrics.flops_per_token(tiny, 32) / 1e9
        assert abs(r["mfu"] - expected) <= 1e-9 * expected, (r["mfu"], expected)


def test_plot_shows_mfu_beside_tokens_per_s(tmp_path):
    """The throughput panel carries MFU (in %) on a second axis when the rows have it."""
    import matplotlib.pyplot as plt

    rows = [{"step": 1, "loss": 5.0, "lr": 1e-4, "tokens_per_s": 4.0e4, "mfu": 0.40},
            {"step": 2, "loss": 4.0, "lr": 2e-4, "tokens_per_s": 5.0e4, "mfu": 0.50}]
    metrics.plot(rows, tmp_path / "metrics.png")
    assert (tmp_path / "metrics.png").is_file()
    [mfu_axis] = [ax for ax in plt.gcf().axes if ax.get_ylabel().startswith("MFU")]
    assert list(mfu_axis.lines[0].get_ydata()) == [40.0, 50.0]
    plt.close("all")


def test_plot_draws_hellaswag_only_where_it_was_measured(tmp_path):
    """Without HellaSwag rows the plot has no HellaSwag panel; with them it has one."""
    import matplotlib.pyplot as plt

    rows = [{"step": 1, "loss": 5.0, "lr": 1e-4, "tokens_per_s": 4.0e4},
            {"step": 2, "loss": 4.0, "lr": 2e-4, "tokens_per_s": 5.0e4}]
    assert "HellaSwag" not in metrics.plot(rows, tmp_path / "off.png")
    rows.append({"step": 2, "hellaswag_acc": 0.25, "hellaswag_acc_norm": 0.3})
    assert "HellaSwag" in metrics.plot(rows, tmp_path / "on.png")
    plt.close("all")
