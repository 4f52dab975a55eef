"""Generation under ZeRO-3: the model gathered once per evaluation versus stage 3's per-module gathers.

Under ZeRO-3 every parameter is partitioned; DeepSpeed's module hooks gather a module's parameters at
each of its forward calls and free them after, so greedy decoding gathers the whole model once per
generated token. ``Distributor.for_generation(strategy)`` offers two strategies, measured here:

  gather   every parameter gathered once (one all-gather of the model), stage 3's hooks off while
           generating, the partitions back afterwards: needs the whole model's bytes free on each GPU
  hooks    DeepSpeed's hooks as in training: the model's bytes communicated per generated token

Each rank builds the same random LLaMA (LoRA r=8 on q, v; ``mlp.gate_proj`` a GORP full-rank target)
under gorp_ds.initialize with stage 3 (``stage3_param_persistence_threshold`` given by
``--persistence``: 0 partitions even this tiny model's tensors), then for each strategy times
the evaluation's decoder (``--decoder``: ``generate``, transformers' generate(), or ``loop``, our greedy
loop) on a batch of random prompts, checks the tokens against the unpartitioned model's (fp32:
identical) and counts the collectives issued while decoding, beyond those of entering and leaving
``for_generation`` (``gather``: none, whatever the number of tokens). One JSON line per measurement, a table at the end,
results appended to ``--out-dir/zero3_generation.jsonl`` as they come.

    python bench/zero3_generation.py --ranks 2                    # CPU (gloo ranks spawned here)
    deepspeed --num_gpus 1 bench/zero3_generation.py --hidden 4096 --layers 32 --intermediate 11008 \\
        --heads 32 --vocab 32000 --dtype bf16 --persistence 100000 --out-dir bench/results
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STRATEGIES = ("gather", "hooks")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--strategy", default="gather,hooks", help="comma-separated: gather, hooks")
    parser.add_argument("--ranks", type=int, default=2, help="CPU gloo ranks to spawn (without a launcher)")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=None)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="timed generations per strategy (after one warm-up)")
    parser.add_argument("--persistence", type=int, default=0, help="stage3_param_persistence_threshold")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--decoder", default=None, help="generate or loop (default: the evaluation's default)")
    parser.add_argument("--out-dir", default=None, help="append results to <dir>/zero3_generation.jsonl")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher's
    args = parser.parse_args(argv)
    args.strategies = [s.strip() for s in args.strategy.split(",") if s.strip()]
    unknown = [s for s in args.strategies if s not in STRATEGIES]
    if unknown or not args.strategies:
        parser.error(f"--strategy {args.strategy!r}: choose from {', '.join(STRATEGIES)}")
    return args


def build_model(args: argparse.Namespace, device: torch.device):
    """The random LLaMA, built directly on ``device`` in its dtype (a 7B shape initialises on the GPU
    in seconds), LoRA-wrapped, with GORP's param groups."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from gorp_ds.models import TargetsConfig, add_lora, build_param_groups
    from gorp_ds.models.lora import LoraSettings
    from gorp_ds.optim.config import OptimizerConfig

    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate
                         or 2 * args.hidden + 8, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    with device:
        model = LlamaForCausalLM._from_config(config, torch_dtype=torch.bfloat16 if args.dtype == "bf16"
                                              else torch.float32)
    model = add_lora(model, LoraSettings())
    groups = build_param_groups(model, "gorp", TargetsConfig(full_targets=["mlp.gate_proj"]), OptimizerConfig(rank=8))
    return model, groups


def prompts(args: argparse.Namespace, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, args.vocab, (args.batch, args.prompt_len), generator=g)
    return ids.to(device), torch.ones_like(ids).to(device)


def measure(rank: int, world: int, args: argparse.Namespace) -> list[dict]:
    import torch.distributed as dist

    import gorp_ds
    from gorp_ds.cl.evaluate import DECODERS, DEFAULT_DECODER
    from gorp_ds.optim import GORP
    from tests.support.lowrank_scenarios import CollectiveCounter

    decoder_name = args.decoder or DEFAULT_DECODER
    decode = DECODERS[decoder_name]

    device = torch.device(f"cuda:{torch.cuda.current_device()}") if torch.cuda.is_available() else torch.device("cpu")
    model, groups = build_model(args, device)
    model.to(device)  # the LoRA factors
    ids, mask = prompts(args, device)
    never = args.vocab  # an end-of-sequence id the head cannot produce: every row generates --new-tokens tokens
    with torch.no_grad():
        reference = decode(model, ids, mask, args.new_tokens, never, 0).cpu()  # unpartitioned model
    ds_config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
                 "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": args.persistence},
                 "bf16": {"enabled": args.dtype == "bf16"}}
    engine, _, _, _ = gorp_ds.initialize(model=model, optimizer=GORP(groups), config=ds_config)
    handle = engine.gorp
    results = []
    for strategy in args.strategies:
        times, tokens = [], None
        for repeat in range(args.repeats + 1):
            if device.type == "cuda":
                torch.cuda.synchronize()
            dist.barrier()
            start = time.perf_counter()
            with handle.for_generation(strategy) as used, torch.no_grad():
                tokens = decode(engine.module, ids, mask, args.new_tokens, never, 0)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if repeat:  # the first one warms up (traces, caches)
                times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        calls = []  # collectives of for_generation alone, then with a generation inside
        for generate in (False, True):
            with CollectiveCounter() as counter, handle.for_generation(strategy), torch.no_grad():
                if generate:
                    decode(engine.module, ids, mask, args.new_tokens, never, 0)
            calls.append(len(counter.calls))
        result = {"strategy": used, "decoder": decoder_name, "world": world, "rank": rank, "hidden": args.hidden, "layers": args.layers,
                  "batch": args.batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                  "dtype": args.dtype, "persistence": args.persistence, "seconds": round(seconds, 4),
                  "tokens_per_s": round(args.batch * args.new_tokens / seconds, 1),
                  "same_tokens_as_unpartitioned": bool(torch.equal(tokens.cpu(), reference)),
                  "collectives_while_decoding": calls[1] - calls[0],
                  "device": device.type}
        results.append(result)
        if rank == 0:
            print(json.dumps(result), flush=True)
            if args.out_dir:
                os.makedirs(args.out_dir, exist_ok=True)
                with open(os.path.join(args.out_dir, "zero3_generation.jsonl"), "a") as f:
                    f.write(json.dumps(result) + "\n")
    engine.destroy()
    return results


def table(results: list[dict]) -> str:
    lines = ["| strategy | decoder | world | tokens/s (per rank) | s per generation | tokens = unpartitioned | "
             "collectives while decoding |", "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['strategy']} | {r['decoder']} | {r['world']} | {r['tokens_per_s']:,.1f} | {r['seconds']:.3f} | "
                     f"{'yes' if r['same_tokens_as_unpartitioned'] else 'NO'} | {r['collectives_while_decoding']} |")
    return "\n".join(lines)


def _spawned(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    results = measure(rank, world, args)
    if rank == 0:
        torch.save(results, out)
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()  # before the interpreter's teardown, which gloo's threads may abort


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if "RANK" in os.environ:  # under a launcher (deepspeed, torchrun)
        import deepspeed
        import torch.distributed as dist

        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        deepspeed.init_distributed()
        results = measure(dist.get_rank(), dist.get_world_size(), args)
    else:  # CPU: spawn --ranks gloo processes
        import socket
        import tempfile

        import torch.multiprocessing as mp

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "results.pt")
            mp.start_processes(_spawned, args=(args.ranks, port, args, out), nprocs=args.ranks, start_method="spawn")
            results = torch.load(out, weights_only=False)
    if int(os.environ.get("RANK", "0")) == 0:
        print(table(results))
        if any(not r["same_tokens_as_unpartitioned"] for r in results) and args.dtype == "fp32":
            print("ERROR: a strategy generated other tokens than the unpartitioned model", file=sys.stderr)
            return 1
        if any(r["strategy"] == "gather" and r["collectives_while_decoding"] for r in results):
            print("ERROR: the model gathered once still communicates while decoding", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
