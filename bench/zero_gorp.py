"""GORP under DeepSpeed ZeRO-2 versus LoRA-only, on the LLaMA-2-7B shape (random init).

Configurations, side by side in one launch on the same model shape, batch and ZeRO-2 setup:
  lora          PEFT LoRA r=8 on q,v trained by torch AdamW (fused) — DeepSpeed LoRA-only
  lora+adamw    the same plus full-rank mlp.gate_proj, all with AdamW (no projection)
  gorp          GORP: LoRA q,v (lora_a/lora_b) + full-rank gate_proj projected Adam, k=8, T=10
  gorp-nockpt   gorp without gradient checkpointing (memory only; --no-ckpt-variant)

Reported per configuration (median of timed steps after warm-up, torch.cuda.synchronize around
each step): seconds per step, tokens/s per GPU, ratio to lora, MFU (8·N·tokens/s: 6N plus the
recomputed forward under checkpointing, 6·N·tokens/s without it, against 766 TFLOP/s bf16), peak memory per GPU, and for
gorp the refresh-step overhead (a step that recomputes the 32 projectors minus the median step).

    deepspeed --num_gpus 2 bench/zero_gorp.py --out bench/results/zero_gorp_h200x2.md
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 bench/zero_gorp.py --tiny      # CPU smoke run
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PEAK_TFLOPS = 766.0  # measured bf16 GEMM ceiling on an H200 (../MEASURE anchors)


def model_config(args):
    from transformers import LlamaConfig

    if args.tiny:
        return LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=args.seq)
    return LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=args.layers,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=max(4096, args.seq))


def build_model(args, device):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    dtype = torch.bfloat16 if not args.tiny else torch.float32
    with torch.device(device):
        model = LlamaForCausalLM(model_config(args)).to(dtype)
    model.config.use_cache = False
    return model


def make_engine(name: str, args, device):
    import deepspeed
    from peft import LoraConfig, get_peft_model

    import gorp_ds
    from gorp_ds.models import RoleConfig, build_param_groups
    from gorp_ds.optim import GORP

    model = build_model(args, device)
    if name != "gorp-nockpt":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    config = {
        "train_micro_batch_size_per_gpu": args.micro, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True, "reduce_scatter": True,
                              "reduce_bucket_size": 5e8, "allgather_bucket_size": 5e8},
        "steps_per_print": 10**9,
    }
    if not args.tiny:
        config["bf16"] = {"enabled": True}
    roles = RoleConfig(rank=8, update_gap=args.gap, scale=0.25, lr_lora=2e-4, lr_full=1e-6)
    if name.startswith("gorp"):
        optimizer = GORP(build_param_groups(model, "gorp", roles))
        optimizer.time_refreshes = True
        engine, *_ = gorp_ds.initialize(model=model, optimizer=optimizer, config=config)
        return engine, optimizer
    groups = build_param_groups(model, "gorp", roles)  # LoRA + gate_proj; roles ignored by AdamW
    if name == "lora":
        for p in groups[2]["params"]:
            p.requires_grad_(False)
        groups = groups[:2]
    params = [{"params": g["params"], "lr": g["lr"]} for g in groups]
    optimizer = torch.optim.AdamW(params, fused=torch.cuda.is_available())
    config["zero_allow_untested_optimizer"] = True
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine, optimizer


def run_config(name: str, args, device) -> dict:
    engine, optimizer = make_engine(name, args, device)
    vocab = engine.module.config.vocab_size
    generator = torch.Generator(device=device).manual_seed(1 + dist.get_rank())
    n_params = sum(p.numel() for p in engine.module.parameters())
    times = []
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    total = args.warmup + args.steps
    for _ in range(total):
        ids = torch.randint(0, vocab, (args.micro, args.seq), device=device, generator=generator)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    timed = times[args.warmup:]
    refresh_steps = [i for i in range(args.warmup, total) if name.startswith("gorp") and i % args.gap == 0]
    plain = [t for i, t in zip(range(args.warmup, total), timed) if i not in refresh_steps]
    median = statistics.median(plain)
    tokens = args.micro * args.seq
    result = {
        "config": name, "world_size": dist.get_world_size(), "layers": engine.module.config.num_hidden_layers,
        "seq": args.seq, "micro_batch": args.micro, "params_b": n_params / 1e9, "median_step_s": median,
        "tokens_per_s_per_gpu": tokens / median,
        # 6·N·tokens, plus 2·N·tokens for the recomputed forward under gradient checkpointing
        "mfu": (6 if name == "gorp-nockpt" else 8) * n_params * tokens / median / (PEAK_TFLOPS * 1e12),
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan"),
        "timed_steps": len(plain),
        "refresh_overhead_s": (statistics.median([times[i] for i in refresh_steps]) - median) if refresh_steps else None,
        "refresh_seconds_total": getattr(optimizer, "stats", {}).get("refresh_seconds"),
        "refreshes": getattr(optimizer, "stats", {}).get("refreshes"),
    }
    engine.destroy()
    del engine, optimizer
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def table(results: list[dict]) -> str:
    base = next((r for r in results if r["config"] == "lora"), results[0])
    lines = ["| config | step s | tokens/s/GPU | × lora | MFU | peak GiB/GPU | refresh overhead s |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        overhead = "–" if r["refresh_overhead_s"] is None else f"{r['refresh_overhead_s']:.3f}"
        lines.append(f"| {r['config']} | {r['median_step_s']:.3f} | {r['tokens_per_s_per_gpu']:,.0f} | "
                     f"{r['tokens_per_s_per_gpu'] / base['tokens_per_s_per_gpu']:.3f} | {100 * r['mfu']:.1f}% | "
                     f"{r['peak_mem_gib']:.1f} | {overhead} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--gap", type=int, default=10, help="GORP refresh gap T")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--configs", default="lora,lora+adamw,gorp,gorp-nockpt")
    parser.add_argument("--tiny", action="store_true", help="tiny fp32 model for a CPU smoke run")
    parser.add_argument("--out", default=None, help="write the markdown table here (rank 0)")
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    import deepspeed

    deepspeed.init_distributed()
    if torch.cuda.is_available():
        torch.cuda.set_device(args.local_rank)
    device = torch.device("cuda", args.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    results = []
    for name in args.configs.split(","):
        result = run_config(name, args, device)
        results.append(result)
        if dist.get_rank() == 0:
            print(json.dumps(result), flush=True)
    if dist.get_rank() == 0:
        text = table(results)
        print(text)
        if args.out:
            gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
            header = (f"# GORP under ZeRO-2 vs LoRA-only — {gpu} × {dist.get_world_size()}, torch {torch.__version__}, "
                      f"{time.strftime('%Y-%m-%d')}\n\nLLaMA-2-7B shape ({results[0]['layers']} layers, random init), "
                      f"bf16, seq {args.seq}, micro-batch {args.micro}/GPU, gradient checkpointing (except gorp-nockpt), "
                      f"GORP k=8, T={args.gap}; median of {args.steps} steps after {args.warmup} warm-up.\n\n")
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(header + text + "\n")


if __name__ == "__main__":
    main()
