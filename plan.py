"""Will a config fit, how fast will it run, how long and at what cost: before a GPU hour is spent.

    python plan.py --config configs/llama_1p7b.py --gpu "RTX A6000" --gpus 2
    python plan.py --config configs/llama_1p7b.py --gpu H100 --gpus 8 --nodes 2 --tokens 2e10
    python plan.py --config configs/llama_124m.py --gpu_mem 24 --peak_tflops 165 --seq_len=512
    python plan.py --config configs/llama_1p7b.py --measured out/gpu_check/call1/results.jsonl

One table of candidate settings (DDP, FSDP, FSDP reducing every micro-step x activation
checkpointing none / selective / full x micro-batches that keep the global batch exact): projected
peak memory per GPU and whether it fits with CUDA_RESERVE_GIB to spare, tokens/s and step time at
an MFU it states, the time and GPU-hours (and with --price their cost) to the config's tokens (or
--tokens), and the bytes each GPU sends per step with the time that takes on the link. The fastest row that fits is marked and
its command printed. Projections all: planner.py says what is counted and how it was checked.
Config overrides work as in training (--key=value).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict

from llama_fineweb import planner
from llama_fineweb.train_config import SFTConfig, TrainConfig, load_config
from llama_fineweb.utils import UserError, cli_errors, closed_output_survives

AC_MODES = ("none", "selective", "full")


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="plan.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a config file, as for train_llama.py / finetune.py")
    parser.add_argument("--gpu", default="H100",
                        help='card name, e.g. "RTX A6000", H100, "A100 80GB" (default: %(default)s)')
    parser.add_argument("--gpus", type=int, default=1, help="GPUs per node (default: %(default)s)")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--tokens", type=float,
                        help="tokens to train on (default: the config's max_steps x batch; a decay branch's decay_steps)")
    parser.add_argument("--gpu_mem", type=float, help="GiB per card, for a card the table does not know")
    parser.add_argument("--peak_tflops", type=float, help="the card's dense bf16 peak TFLOP/s (datasheet)")
    parser.add_argument("--mfu", type=float, help=f"assumed MFU (default: {planner.DEFAULT_MFU:g}, or --measured)")
    parser.add_argument("--measured", help="a benchmarks/gpu_check.py results.jsonl: use its best measured MFU")
    parser.add_argument("--link", choices=sorted(planner.LINKS),
                        help="link between a node's GPUs (default: the card's)")
    parser.add_argument("--network", default="ib_ndr", choices=sorted(planner.LINKS),
                        help="link between nodes, per GPU (default: %(default)s)")
    parser.add_argument("--micro_batches", help="comma-separated micro-batches (default: the four largest "
                                                "powers of two up to 32 that divide the batch)")
    parser.add_argument("--price", type=float, help="cost of one GPU-hour (any currency): adds a cost column")
    parser.add_argument("--json", action="store_true", help="print the same as JSON")
    parser.add_argument("--markdown", action="store_true",
                        help="print the table as markdown (docs/parallelism.md's)")
    return parser.parse_known_args(argv)


# The numeric flags that must be positive and finite, each with an example value for the error line.
POSITIVE = {"tokens": "2e10", "gpu_mem": "24", "peak_tflops": "165", "price": "2.5"}


def check_numbers(args: argparse.Namespace) -> None:
    """--tokens, --gpu_mem, --peak_tflops, --price: positive and finite (a NaN or a negative count
    would print as a time or a cost)."""
    for flag, example in POSITIVE.items():
        value = getattr(args, flag)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise UserError(f"--{flag} {value:g} must be a positive finite number, e.g. --{flag} {example}")


def load(args: argparse.Namespace, overrides: list[str]) -> TrainConfig:
    """The config as training would load it (finetune.py's SFTConfig for an SFT config file)."""
    found = load_config(["--config", args.config])  # an SFTConfig file returns one: its knobs are allowed too
    return load_config(["--config", args.config, *overrides], kind=type(found))


def pick_card(args: argparse.Namespace) -> planner.Card:
    if args.gpu_mem is not None:
        if args.peak_tflops is None:
            base = planner.find_card(args.gpu)
            return planner.Card(f"{base.aliases[0]} with {args.gpu_mem:g} GiB", args.gpu_mem, base.link,
                                tflops=base.peak_tflops)
        return planner.custom_card(args.gpu_mem, args.peak_tflops, args.link or "pcie4")
    card = planner.find_card(args.gpu)
    if args.peak_tflops is not None:
        card = planner.Card(card.name, card.memory_gib, card.link, card.aliases, tflops=args.peak_tflops)
    return card


def assumed_mfu(args: argparse.Namespace) -> tuple[float, str]:
    """(MFU, where it comes from)."""
    if args.mfu is not None:
        if not 0 < args.mfu <= 1:
            raise UserError(f"--mfu {args.mfu:g} must be in (0, 1], e.g. 0.4")
        return args.mfu, f"MFU {args.mfu:.0%} from --mfu"
    if args.measured:
        return measured_mfu(args.measured)
    return planner.DEFAULT_MFU, f"MFU {planner.DEFAULT_MFU:.0%} assumed (pass --mfu or --measured)"


def measured_mfu(path: str) -> tuple[float, str]:
    """The best MFU of the rows that ran fine in a gpu_check results file."""
    try:
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except OSError as e:
        raise UserError(f"--measured {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"--measured {path}: not a gpu_check results.jsonl ({e})") from None
    rated = [r for r in rows if r.get("mfu") and str(r.get("verdict", "")).startswith("ok")]
    if not rated:
        raise UserError(f"--measured {path}: no row with a measured MFU (run benchmarks/gpu_check.py on a GPU)")
    best = max(rated, key=lambda r: r["mfu"])
    return best["mfu"], f"MFU {best['mfu']:.1%} measured ({path}, row {best.get('row', '?')}: {best.get('config', '')})"


def micro_batches(args: argparse.Namespace, cfg: TrainConfig, world: int) -> list[int]:
    choices = planner.micro_batch_choices(cfg.total_batch_tokens, cfg.seq_len, world)
    if not choices:
        raise UserError(f"total_batch_tokens={cfg.total_batch_tokens:,} / seq_len={cfg.seq_len} sequences do not "
                        f"divide over {world} GPUs: no micro-batch keeps the batch exact")
    if args.micro_batches:
        try:
            wanted = [int(m) for m in args.micro_batches.split(",") if m.strip()]
        except ValueError:
            raise UserError(f"--micro_batches {args.micro_batches!r}: expected numbers like 4,8,16") from None
        bad = [m for m in wanted if m not in choices]
        if bad:
            raise UserError(f"--micro_batches {bad[0]} does not divide the {choices[-1]} sequences per GPU "
                            f"per step; choose from {choices}")
        return wanted
    return [m for m in choices if m & (m - 1) == 0 and m <= 32][-4:]


def candidates(cfg: TrainConfig, world: int, mbs: list[int]) -> list[planner.Setting]:
    lora_params = planner.setting_from_config(cfg, world, "cuda").lora_params
    # LoRA runs under DDP only (train_config refuses FSDP with it)
    kinds = [("ddp", False)] + ([("fsdp", False), ("fsdp", True)] if world > 1 and not lora_params else [])
    out = []
    for par, every in kinds:
        for ac in AC_MODES:
            for mb in mbs:
                out.append(planner.Setting(
                    parallel=par, reduce_every_micro_step=every, activation_checkpointing=ac, ac_every=cfg.ac_every,
                    micro_batch=mb, world_size=world, shard_size=cfg.fsdp_shard_size if par == "fsdp" else 0,
                    accum=cfg.total_batch_tokens // (mb * cfg.seq_len * world), dtype=cfg.dtype,
                    lora_params=planner.lora_parameters(cfg.model_config(), cfg.lora_spec())))
    return out


def relies_on_compile(r: planner.Projection) -> bool:
    """Fits only with compile's activation saving, which no GPU has measured yet."""
    return r.fits and not r.fits_eager and not planner.COMPILE_SAVING_MEASURED_ON_GPU


def recommend(rows: list[planner.Projection]) -> int | None:
    """The fastest row that fits (one that fits only with compile's unmeasured activation saving
    when no other does); among equally fast ones the one that sends the fewest bytes (the
    projection assumes communication overlaps, which is least sure for the most of it), then the
    larger micro-batch (a GPU runs larger matmuls closer to its peak)."""
    fitting = ([i for i, r in enumerate(rows) if r.fits and not relies_on_compile(r)]
               or [i for i, r in enumerate(rows) if r.fits])
    return min(fitting, key=lambda i: (round(rows[i].step_s, 6), rows[i].comm_gb, -rows[i].setting.micro_batch, i)) \
        if fitting else None


def smallest_change(cfg: TrainConfig, card: planner.Card, gpus: int, nodes: int) -> str:
    """What would fit when nothing does: more GPUs (FSDP, full checkpointing, micro-batch 1), or a
    shorter sequence on these."""
    c = cfg.model_config()
    lean = dict(parallel="fsdp", reduce_every_micro_step=True, activation_checkpointing="full", micro_batch=1,
                dtype=cfg.dtype)

    def fits(world: int, seq_len: int) -> bool:
        s = planner.Setting(world_size=world, accum=2, **lean)
        mc = cfg.model_config() if seq_len == cfg.seq_len else c.__class__(**{**c.to_dict(), "max_seq_len": seq_len})
        return planner.peak_bytes(mc, s, seq_len) / planner.GiB + planner.CUDA_RESERVE_GIB <= card.memory_gib

    world = gpus * nodes
    more = next((w for w in (2 * world, 4 * world, 8 * world, 16 * world, 32 * world) if fits(w, cfg.seq_len)), None)
    shorter = next((t for t in (cfg.seq_len // 2, cfg.seq_len // 4, cfg.seq_len // 8) if t >= 64 and fits(world, t)),
                   None)
    options = []
    if more:
        options.append(f"{more} GPUs in all with --parallel=fsdp --fsdp_reduce_every_micro_step=true "
                       f"--activation_checkpointing=full --micro_batch=1")
    if shorter:
        options.append(f"--seq_len={shorter} on these {world} GPUs with FSDP and full checkpointing")
    return " or ".join(options) if options else "a card with more memory"


def command(cfg: TrainConfig, config_path: str, s: planner.Setting, gpus: int, nodes: int, overrides: list[str]) -> str:
    script = "finetune.py" if isinstance(cfg, SFTConfig) else "train_llama.py"
    knobs = {"micro_batch": s.micro_batch, "parallel": s.parallel,
             "fsdp_reduce_every_micro_step": str(s.reduce_every_micro_step).lower(),
             "activation_checkpointing": s.activation_checkpointing}
    defaults = {"micro_batch": cfg.micro_batch, "parallel": cfg.parallel,
                "fsdp_reduce_every_micro_step": str(cfg.fsdp_reduce_every_micro_step).lower(),
                "activation_checkpointing": cfg.activation_checkpointing}
    kept = [o for o in overrides if o.partition("=")[0][2:] not in knobs]
    args = [f"--config {config_path}", *kept, *(f"--{k}={v}" for k, v in knobs.items() if v != defaults[k])]
    if gpus * nodes == 1:
        launch = f"python {script}"
    elif nodes == 1:
        launch = f"torchrun --standalone --nproc_per_node={gpus} {script}"
    else:
        launch = (f"torchrun --nnodes={nodes} --nproc_per_node={gpus} --rdzv_backend=c10d "
                  f"--rdzv_endpoint=NODE0:29500 --rdzv_id=RUN {script}")
    return " ".join([launch, *args])


def duration(seconds: float) -> str:
    days, rest = divmod(seconds, 86400)
    return f"{days:.0f}d {rest / 3600:.1f}h" if days else f"{rest / 3600:.1f}h"


def fits_cell(r: dict) -> str:
    if r["fits"] and (r["fits_eager"] or planner.COMPILE_SAVING_MEASURED_ON_GPU):
        return "yes"
    return "if compiled (c)" if r["fits"] else "no"


def render(report: dict, markdown: bool) -> str:
    rows = report["rows"]
    header = ["", "setting", "checkpointing", "micro-batch", "accum", "peak GiB", "fits", "tokens/s", "step s",
              "comm GB/step (s)", f"time to {report['tokens'] / 1e9:.1f}B tokens", "GPU-hours"]
    price = report["price"]
    if price:
        header.append(f"cost at {price:g}/GPU-hour")
    body = []
    for i, r in enumerate(rows):
        s = r["setting"]
        body.append(["*" if i == report["recommended"] else "", planner.Setting(**s).label(),
                     s["activation_checkpointing"], str(s["micro_batch"]), str(s["accum"]), f"{r['peak_gib']:.1f}",
                     fits_cell(r), f"{r['tokens_per_s']:,.0f}", f"{r['step_s']:.2f}",
                     f"{r['comm_gb']:.1f} ({r['comm_s']:.2f})", duration(r["total_s"]), f"{r['gpu_hours']:,.0f}"]
                    + ([f"{r['gpu_hours'] * price:,.0f}"] if price else []))
    lines = [report["title"], report["assumptions"], ""]
    if markdown:
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join("---" if j < 3 else "---:" for j in range(len(header))) + "|")
        lines += ["| " + " | ".join(row) + " |" for row in body]
    else:
        widths = [max(len(row[j]) for row in [header, *body]) for j in range(len(header))]
        for row in [header, *body]:
            lines.append("  ".join(cell.ljust(w) if j < 3 else cell.rjust(w)
                                   for j, (cell, w) in enumerate(zip(row, widths))).rstrip())
    lines.append("")
    marked = any(fits_cell(r).endswith("(c)") for r in rows)
    if marked:
        lines.append("(c) fits only if compile's activation saving (32.07/51.07 of eager, measured on the CPU) "
                     "holds on the GPU: unmeasured there, so not recommended while another row fits")
    if report["recommended"] is None:
        lines.append(f"nothing fits: {report['nothing_fits']}")
    elif fits_cell(rows[report["recommended"]]).endswith("(c)"):
        lines.append("* recommended: the fastest setting that fits, and only if compiled (c): nothing fits eager")
    else:
        lines.append("* recommended: the fastest setting that fits")
        lines.append(f"`{report['command']}`" if markdown else report["command"])
    return "\n".join(lines)


def plan(argv: list[str]) -> dict:
    args, overrides = parse_args(argv)
    check_numbers(args)
    if args.gpus < 1 or args.nodes < 1:
        raise UserError(f"--gpus {args.gpus} --nodes {args.nodes}: both must be at least 1")
    cfg = load(args, overrides)
    card = pick_card(args)
    link = args.link or card.link
    card = planner.Card(card.name, card.memory_gib, link, card.aliases, card.tflops)
    mfu, mfu_note = assumed_mfu(args)
    world = args.gpus * args.nodes
    # a decay branch (--decay_from) trains its decay_steps alone, from its checkpoint's step
    tokens = args.tokens or (cfg.decay_steps if cfg.decay_from else cfg.max_steps) * cfg.total_batch_tokens
    c = cfg.model_config()
    rows = [planner.project(c, s, cfg.seq_len, cfg.total_batch_tokens, card, mfu, tokens, args.nodes, args.network)
            for s in candidates(cfg, world, micro_batches(args, cfg, world))]
    best = recommend(rows)
    n = planner.parameter_counts(c)
    links = planner.LINKS[link][1] + (f"; between nodes {planner.LINKS[args.network][1]}" if args.nodes > 1 else "")
    return {
        "title": f"{args.config}: {cfg.model} ({n['total']:,} parameters), seq {cfg.seq_len}, "
                 f"{cfg.total_batch_tokens:,} tokens/step on {world} x {card.name}"
                 f"{f' ({args.nodes} nodes)' if args.nodes > 1 else ''} "
                 f"({card.memory_gib:.1f} GiB, {card.peak_tflops:g} TFLOP/s bf16); projections, not measurements",
        "assumptions": f"{mfu_note}; {planner.CUDA_RESERVE_GIB:g} GiB per card kept for the CUDA context; "
                       f"bf16 on CUDA, compiled; link: {links}",
        "config": args.config, "card": asdict(card), "gpus": args.gpus, "nodes": args.nodes, "mfu": mfu,
        "tokens": tokens, "price": args.price, "rows": [r.to_dict() for r in rows], "recommended": best,
        "command": (command(cfg, args.config, rows[best].setting, args.gpus, args.nodes, overrides)
                    if best is not None else None),
        "nothing_fits": smallest_change(cfg, card, args.gpus, args.nodes) if best is None else None,
        "markdown": args.markdown, "json": args.json,
    }


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    with closed_output_survives():
        with cli_errors("plan.py"):
            report = plan(argv)
        if report.pop("json"):
            # allow_nan=False: what --json prints is JSON; a non-finite number is a bug, not output
            print(json.dumps({k: v for k, v in report.items() if k != "markdown"}, indent=1, allow_nan=False))
        else:
            print(render(report, report.pop("markdown")))
    return report


if __name__ == "__main__":
    main()
