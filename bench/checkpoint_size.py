"""Checkpoint size and save/load time, old format beside new, on the LLaMA-2-7B shape.

One GPU, ZeRO-2, bf16, random init; GORP as the runner builds it (LoRA q, v r = 8 + full-rank
mlp.gate_proj, k = 8). The engine takes a few optimizer steps, closes a task (S extended, LoRA
merged and re-initialised, exactly as the runner's task boundary) and takes one more step; then:

  old   what the runner wrote before: GORP's ``gorp_state`` plus DeepSpeed's
        ``engine.save_checkpoint`` (the whole bf16 module, DeepSpeed's fp32 partitions and
        optimizer state); timed until the calls return and until ``os.sync()`` returns;
  new   ``gorp_ds.zero.save_checkpoint``: trainable state only, fsynced, manifest with CRC-32,
        atomic commit; then ``load_checkpoint`` (verifying every checksum) into the same engine,
        checked against the fp32 masters held before the save, and the replay of the LoRA merges.

Each checkpoint is deleted after it is measured (the old one is ~32 GB). One JSON line per
measurement on stdout and in ``--out``/checkpoint_size.jsonl, then a markdown table in
``--out``/checkpoint_size.md.

    deepspeed --num_gpus 1 bench/checkpoint_size.py --out bench/results/checkpoint_size_h200
    DS_ACCELERATOR=cpu deepspeed --num_gpus 1 bench/checkpoint_size.py --tiny --out /tmp/ckpt_bench   # CPU smoke
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import zlib
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def model_config(args):
    from transformers import LlamaConfig

    if args.tiny:
        return LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=args.seq)
    return LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=args.layers,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)


def build_engine(args, device):
    """The runner's GORP setup (``MethodSession``) on a random-init model."""
    from transformers import LlamaForCausalLM

    import gorp_ds
    from gorp_ds.models import LoraSettings, TargetsConfig, add_lora, build_param_groups
    from gorp_ds.models.loading import enable_activation_checkpointing, model_fingerprint
    from gorp_ds.models.lora import init_lora_
    from gorp_ds.optim import GORP
    from gorp_ds.optim.config import OptimizerConfig

    torch.manual_seed(0)
    dtype = torch.float32 if args.tiny else torch.bfloat16
    with torch.device(device):
        model = LlamaForCausalLM(model_config(args)).to(dtype)
    model.config.use_cache = False
    enable_activation_checkpointing(model)
    fingerprint = model_fingerprint(model)
    model = add_lora(model, LoraSettings(8, 32.0, ["q_proj", "v_proj"]))
    init_lora_(model, 0, 0)
    groups = build_param_groups(model, "gorp", TargetsConfig(), OptimizerConfig(rank=8, update_gap=args.gap, lr_lora=2e-4, lr_full=1e-6))
    config = {
        "train_micro_batch_size_per_gpu": args.micro, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True, "reduce_scatter": True,
                              "reduce_bucket_size": 2e8, "allgather_bucket_size": 2e8},
        "steps_per_print": 10**9,
    }
    if not args.tiny:
        config["bf16"] = {"enabled": True}
    optimizer = GORP(groups)
    # The flat path (gate_proj in DeepSpeed's buffers): what the runner trained with when it wrote the
    # old format; the new format stores the same masters whichever path trained them.
    engine, *_ = gorp_ds.initialize(model=model, optimizer=optimizer, config=config, full_gradients="flat")
    return engine, optimizer, fingerprint


def train_steps(engine, args, device, steps: int) -> None:
    vocab = engine.module.config.vocab_size
    generator = torch.Generator(device=device).manual_seed(1)
    for _ in range(steps):
        ids = torch.randint(0, vocab, (args.micro, args.seq), device=device, generator=generator)
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()


def close_task(engine, optimizer) -> list:
    """The runner's task boundary for gorp (``MethodSession.end_task``); returns the merge records."""
    from gorp_ds.models.lora import lora_merge_record, merge_and_reinit_

    optimizer.end_task()
    merges = [lora_merge_record(engine.module)]
    changed = merge_and_reinit_(engine.module, 0, 0)
    engine.gorp.masters_from_model(changed)
    return merges


def sync_gpu() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def dir_bytes(path: Path) -> tuple[int, dict[str, int]]:
    files = {str(p.relative_to(path)): p.stat().st_size for p in path.rglob("*") if p.is_file()}
    return sum(files.values()), files


@torch.no_grad()
def masters_digest(engine) -> dict[str, float]:
    return {name: float(master.double().sum()) for name, (_, _, master) in engine.gorp.held_masters().items()}


def measure_old(engine, root: Path, progress: dict) -> dict:
    from gorp_ds.zero import save_gorp_state

    directory = root / "old"
    tag = "task02_step000001"  # 1 step into task 2
    sync_gpu()
    start = time.perf_counter()
    save_gorp_state(engine.gorp, str(directory / tag))  # as main did: GORP first, then DeepSpeed
    engine.save_checkpoint(str(directory), tag=tag, client_state={"progress": progress, "old_lora_a": {},
                                                                   "method": "gorp"})
    returned = time.perf_counter() - start
    os.sync()
    synced = time.perf_counter() - start
    total, files = dir_bytes(directory)
    shutil.rmtree(directory)
    return {"format": "old", "bytes": total, "save_s": returned, "save_and_sync_s": synced,
            "files": {k: v for k, v in sorted(files.items(), key=lambda kv: -kv[1])[:6]}}


def measure_new(engine, root: Path, progress: dict, merges: list, fingerprint: dict) -> dict:
    from gorp_ds.models.lora import replay_lora_merges_
    from gorp_ds.zero import load_checkpoint, save_checkpoint

    directory = root / "new"
    tag = "task02_step000001"  # 1 step into task 2
    before = masters_digest(engine)
    client = {"progress": progress, "method": "gorp", "lora_merges": merges, "base_model": fingerprint}
    sync_gpu()
    start = time.perf_counter()
    save_checkpoint(engine, str(directory), tag, client)  # fsyncs each file itself
    saved = time.perf_counter() - start
    os.sync()
    synced = time.perf_counter() - start
    total, files = dir_bytes(directory / tag)
    rank_file = directory / tag / "gorp_state" / "rank_00000.pt"
    start = time.perf_counter()
    crc = 0
    with open(rank_file, "rb") as handle:
        while chunk := handle.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    crc_s = time.perf_counter() - start
    # Load into the same engine after scrambling its masters: the values must come back.
    with torch.no_grad():
        for _, (_, _, master) in engine.gorp.held_masters().items():
            master.zero_()
    sync_gpu()
    start = time.perf_counter()
    load_checkpoint(engine, str(directory))
    sync_gpu()
    load_s = time.perf_counter() - start
    after = masters_digest(engine)
    start = time.perf_counter()
    replayed = replay_lora_merges_(engine.module, merges)  # what resume adds on top of the load
    sync_gpu()
    replay_s = time.perf_counter() - start
    shutil.rmtree(directory)
    return {"format": "new", "bytes": total, "save_s": saved, "save_and_sync_s": synced, "load_s": load_s,
            "replay_merges_s": replay_s, "replayed_matrices": replayed, "crc32_read_s": crc_s,
            "masters_restored_exactly": before == after, "files": files}


def expectations(engine, merges: list) -> dict:
    """Sizes from the shapes, to read the measurements against."""
    module = engine.module
    params = list(module.parameters())
    bf16_model = sum(p.numel() * p.element_size() for n, p in module.named_parameters() if ".lora_" not in n)
    full = [p for n, p in module.named_parameters() if n.endswith("mlp.gate_proj.weight")]
    lora = [p for n, p in module.named_parameters() if ".lora_" in n]
    merge_bytes = sum(t.numel() * t.element_size() for layer in merges[0].values() for t in (layer["A"], layer["B"]))
    changed_modules = sum(p.numel() * p.element_size() for n, p in module.named_parameters()
                          if n.endswith(("q_proj.base_layer.weight", "v_proj.base_layer.weight")))
    return {"format": "shapes", "params_b": sum(p.numel() for p in params) / 1e9,
            "model_bytes": bf16_model, "full_fp32_bytes": 4 * sum(p.numel() for p in full),
            "lora_fp32_bytes": 4 * sum(p.numel() for p in lora),
            "merge_record_bytes_per_task": merge_bytes, "changed_modules_bytes_per_task": changed_modules}


def table(rows: dict) -> str:
    shapes, old, new = rows["shapes"], rows["old"], rows["new"]
    gb = 1e9
    lines = [
        "| format | bytes on disk | × bf16 model | save s (calls return) | save s (+ os.sync) | load s |",
        "|---|---|---|---|---|---|",
        f"| old (DeepSpeed files + gorp_state) | {old['bytes'] / gb:.2f} GB | {old['bytes'] / shapes['model_bytes']:.2f} | "
        f"{old['save_s']:.1f} | {old['save_and_sync_s']:.1f} | – |",
        f"| new (trainable state, atomic) | {new['bytes'] / gb:.2f} GB | {new['bytes'] / shapes['model_bytes']:.2f} | "
        f"{new['save_s']:.1f} | {new['save_and_sync_s']:.1f} | {new['load_s']:.1f} (+ {new['replay_merges_s']:.2f} replay) |",
        "",
        f"Reference sizes: bf16 model {shapes['model_bytes'] / gb:.2f} GB; fp32 `gate_proj` masters "
        f"{shapes['full_fp32_bytes'] / gb:.2f} GB; fp32 LoRA {shapes['lora_fp32_bytes'] / 1e6:.1f} MB; "
        f"per finished task, LoRA merge record {shapes['merge_record_bytes_per_task'] / 1e6:.1f} MB vs changed q/v "
        f"modules {shapes['changed_modules_bytes_per_task'] / gb:.2f} GB. CRC-32 of the new rank file (read back): "
        f"{new['crc32_read_s']:.2f} s. Masters restored exactly: {new['masters_restored_exactly']}.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--micro", type=int, default=1)
    parser.add_argument("--gap", type=int, default=10)
    parser.add_argument("--tiny", action="store_true", help="tiny fp32 model for a CPU smoke run")
    parser.add_argument("--ckpt-dir", default=None, help="where checkpoints are written (default: under --out)")
    parser.add_argument("--out", required=True, help="results directory (JSON lines and markdown)")
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    import deepspeed

    deepspeed.init_distributed()
    if dist.get_world_size() != 1:
        sys.exit("checkpoint_size.py measures one GPU: run with --num_gpus 1")
    if torch.cuda.is_available():
        torch.cuda.set_device(args.local_rank)
    device = torch.device("cuda", args.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(args.ckpt_dir) if args.ckpt_dir else out / "checkpoints.tmp"
    root.mkdir(parents=True, exist_ok=True)
    log = open(out / "checkpoint_size.jsonl", "a")

    def report(row: dict) -> None:
        line = json.dumps(row)
        print(line, flush=True)
        log.write(line + "\n")
        log.flush()

    engine, optimizer, fingerprint = build_engine(args, device)
    train_steps(engine, args, device, 2)
    merges = close_task(engine, optimizer)
    train_steps(engine, args, device, 1)
    progress = {"task_number": 2, "step": 1, "rows": {}, "timings": {}, "global_step": 3}  # Progress.to_state()
    rows = {"shapes": expectations(engine, merges)}
    report(rows["shapes"])
    try:
        rows["old"] = measure_old(engine, root, progress)
        report(rows["old"])
        rows["new"] = measure_new(engine, root, progress, merges, fingerprint)
        report(rows["new"])
    finally:  # never leave tens of GB behind
        shutil.rmtree(root / "old", ignore_errors=True)
        shutil.rmtree(root / "new", ignore_errors=True)
        if not args.ckpt_dir:
            shutil.rmtree(root, ignore_errors=True)
    text = table(rows)
    print(text)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    header = (f"# Checkpoint size and time, old vs new format — {gpu}, torch {torch.__version__}, "
              f"{time.strftime('%Y-%m-%d')}\n\n{'tiny smoke model' if args.tiny else 'LLaMA-2-7B shape'} "
              f"({rows['shapes']['params_b']:.2f} B parameters, random init), ZeRO-2 on one device, GORP "
              f"(LoRA q, v r = 8 + full-rank gate_proj, k = 8), after one closed task.\n\n")
    (out / "checkpoint_size.md").write_text(header + text + "\n")
    engine.destroy()


if __name__ == "__main__":
    main()
