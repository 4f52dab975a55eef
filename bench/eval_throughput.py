"""Evaluation throughput: generations per second of the two evaluation decoders, side by side.

The accuracy matrix R is measured by greedy generation (gorp_ds/cl/evaluate.py); ``--eval-decoder``
picks the decoder: ``generate`` (transformers' ``generate()``) or ``loop`` (our own greedy loop).
This script times both in one process on the same model and the same batches, so the faster one
can be the default (``DEFAULT_DECODER`` in gorp_ds/cl/evaluate.py).

Models (``--shapes``), built directly on the device in the measured dtype from a seeded
``normal_(0, 0.02)`` (norm weights 1), no checkpoint read, transformers' own weight init skipped:

  135m    SmolLM2-135M's shape: hidden 576, 30 layers, 9 heads, 3 key/value heads, intermediate
          1536, vocabulary 49152, tied embeddings (random init)
  7b      LLaMA-2-7B's shape: hidden 4096, 32 layers, 32 heads, intermediate 11008, vocabulary
          32000 (random init; 13.5 GB in bf16)
  smoke   a tiny LLaMA (hidden 32, 2 layers, vocabulary 300) for the CPU check
  model   the model given by ``--model`` (a Hugging Face directory, or ``embedded``), loaded by
          gorp_ds's loader with its weights

Batches: random token ids; each row's prompt length drawn uniformly from ``--prompt-tokens``
(the project's prompts: an instruction, the input text and an answer cue, 128–256 tokens for the
classification tasks), left-padded to the batch's longest as evaluation pads them. Every row
generates exactly ``--new-tokens`` tokens with either decoder: the end-of-sequence id given to
both is the vocabulary size, an id the LM head cannot produce (so neither stops early and both do
equal work). Timing: ``--warmup`` untimed calls of each decoder, then ``--repeats`` rounds of one
call of each (alternating, so drift hits both alike), each call between ``torch.cuda.synchronize()``;
the median is reported. Each measurement is appended to ``<out>/eval_throughput.jsonl`` and the
table ``<out>/eval_throughput.md`` is rewritten as results come, so a timeout keeps what was
measured. Needs the project's Python dependencies (torch, transformers, pydantic), not deepspeed, and no data files.

    python bench/eval_throughput.py --out $OUT --shapes 135m,7b --batch-sizes 1,8,32,64    # one GPU
    python bench/eval_throughput.py --smoke --out /tmp/eval_tp                              # CPU, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gorp_ds.cl.evaluate import DECODERS, DEFAULT_DECODER  # noqa: E402

SHAPES: dict[str, dict[str, Any]] = {
    "135m": {"hidden": 576, "layers": 30, "heads": 9, "kv_heads": 3, "intermediate": 1536, "vocab": 49152,
             "tied": True, "rope_theta": 100000.0},
    "7b": {"hidden": 4096, "layers": 32, "heads": 32, "kv_heads": 32, "intermediate": 11008, "vocab": 32000,
           "tied": False, "rope_theta": 10000.0},
    "smoke": {"hidden": 32, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": 72, "vocab": 300,
              "tied": False, "rope_theta": 10000.0},
}
JSONL, TABLE = "eval_throughput.jsonl", "eval_throughput.md"
INIT_STD = 0.02  # transformers' LLaMA initializer_range


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{flag} wants comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{flag} wants integers >= 1, got {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="directory for eval_throughput.jsonl and eval_throughput.md")
    parser.add_argument("--shapes", default="135m,7b", help=f"comma-separated: {', '.join(SHAPES)}, model")
    parser.add_argument("--model", default=None, help="the 'model' shape: a Hugging Face directory or 'embedded'")
    parser.add_argument("--batch-sizes", default="1,8,32,64", help="comma-separated generation batch sizes")
    parser.add_argument("--prompt-tokens", default="128-256", help="prompt length range MIN-MAX (or one length)")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens generated per row (all of them)")
    parser.add_argument("--decoders", default=",".join(DECODERS), help="comma-separated: " + ", ".join(DECODERS))
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (one call of each decoder per round)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls of each decoder first")
    parser.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto", help="auto: bf16 on a GPU, fp32 on CPU")
    parser.add_argument("--device", default="auto", help="auto: cuda when available, else cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="CPU check in seconds: the smoke shape, fp32, "
                        "batch sizes 1,3, prompts 6-20 tokens, 4 new tokens, 2 repeats, 1 warm-up")
    args = parser.parse_args(argv)
    if args.smoke:
        given = set(argv or sys.argv[1:])
        defaults = {"--shapes": "smoke", "--batch-sizes": "1,3", "--prompt-tokens": "6-20", "--new-tokens": 4,
                    "--repeats": 2, "--warmup": 1, "--device": "cpu"}
        for flag, value in defaults.items():
            if not any(g == flag or g.startswith(flag + "=") for g in given):
                setattr(args, flag[2:].replace("-", "_"), value)
    try:
        args.batch_sizes = _ints(args.batch_sizes, "--batch-sizes")
        low, _, high = args.prompt_tokens.partition("-")
        args.prompt_range = (int(low), int(high or low))
    except (argparse.ArgumentTypeError, ValueError) as err:
        parser.error(str(err) if isinstance(err, argparse.ArgumentTypeError) else
                     f"--prompt-tokens wants MIN-MAX, got {args.prompt_tokens!r}")
    if not 1 <= args.prompt_range[0] <= args.prompt_range[1]:
        parser.error(f"--prompt-tokens wants 1 <= MIN <= MAX, got {args.prompt_tokens!r}")
    args.shape_list = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in args.shape_list if s not in SHAPES and s != "model"]
    if unknown or not args.shape_list:
        parser.error(f"--shapes {args.shapes!r}: choose from {', '.join(SHAPES)}, model")
    if "model" in args.shape_list and not args.model:
        parser.error("--shapes model needs --model (a Hugging Face directory or 'embedded')")
    args.decoder_list = [d.strip() for d in args.decoders.split(",") if d.strip()]
    if not args.decoder_list or any(d not in DECODERS for d in args.decoder_list):
        parser.error(f"--decoders {args.decoders!r}: choose from {', '.join(DECODERS)}")
    if args.new_tokens < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error("--new-tokens and --repeats must be >= 1, --warmup >= 0")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.dtype == "auto":
        args.dtype = "bf16" if args.device.startswith("cuda") else "fp32"
    return args


@contextlib.contextmanager
def _library_init_skipped() -> Iterator[None]:
    """transformers' weight initialisation off while the model is built (its tensors are then
    overwritten by :func:`random_init_` anyway); a no-op where the helper is not found."""
    try:
        from transformers.initialization import no_init_weights  # transformers 5
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights  # transformers 4
        except ImportError:
            no_init_weights = contextlib.nullcontext
    with no_init_weights():
        yield


@torch.no_grad()
def random_init_(model: torch.nn.Module, seed: int) -> None:
    """Every weight matrix ``normal_(0, INIT_STD)`` from one seeded generator on the model's
    device, every 1-d weight (RMSNorm) 1: reproducible for a seed, fast on a GPU."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    for _, param in sorted(model.named_parameters()):  # named_parameters lists a tied tensor once
        if param.ndim == 1:
            param.fill_(1.0)
        else:
            param.normal_(0.0, INIT_STD, generator=generator)


def build_random(shape: dict[str, Any], dtype: torch.dtype, device: torch.device, seed: int):
    """A random-init LlamaForCausalLM of ``shape``, allocated on ``device`` in ``dtype`` directly
    (no CPU copy, no fp32 copy). Its end-of-sequence id is left unset: the decoders are given theirs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
                         num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
                         intermediate_size=shape["intermediate"], tie_word_embeddings=shape["tied"],
                         rope_theta=shape["rope_theta"], max_position_embeddings=4096, pad_token_id=0,
                         bos_token_id=1, eos_token_id=None)
    with torch.device(device), _library_init_skipped():
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    if shape["tied"]:
        model.tie_weights()
    random_init_(model, seed)
    return model.eval()


def build_model(name: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    """(model, description of its weights), its weights frozen as a run's base model is (only the
    LoRA factors train): on a CPU, a linear layer with a frozen weight takes another path for a
    strided input than one whose weight requires grad (gorp_ds/cl/evaluate.py, _contiguous_input)."""
    if name == "model":
        from gorp_ds.models import ModelConfig, load_model_and_tokenizer

        model, _ = load_model_and_tokenizer(ModelConfig(model=args.model, dtype=args.dtype,
                                                        gradient_checkpointing=False))
        model, weights = model.to(device).eval(), f"{args.model} (its weights)"
    else:
        model, weights = build_random(SHAPES[name], dtype, device, args.seed), f"random init (seed {args.seed})"
    return model.requires_grad_(False), weights


def make_batch(batch: int, prompt_range: tuple[int, int], vocab: int, pad: int, seed: int,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``B × L`` left-padded random prompts (ids 3 .. vocab-1; L the longest drawn length) and their mask."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(prompt_range[0], prompt_range[1] + 1, (batch,), generator=g)
    width = int(lengths.max())
    ids = torch.full((batch, width), pad, dtype=torch.long)
    mask = torch.zeros((batch, width), dtype=torch.long)
    for row, length in enumerate(lengths.tolist()):
        ids[row, width - length:] = torch.randint(3, vocab, (length,), generator=g)
        mask[row, width - length:] = 1
    return ids.to(device), mask.to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(model, decoders: list[str], ids: torch.Tensor, mask: torch.Tensor, new_tokens: int, never: int,
            warmup: int, repeats: int, device: torch.device) -> tuple[dict[str, list[float]], dict[str, torch.Tensor]]:
    """Seconds per call of each decoder (``repeats`` each, alternating) and each one's tokens."""
    times: dict[str, list[float]] = {d: [] for d in decoders}
    tokens: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for _ in range(warmup):
            for name in decoders:
                tokens[name] = DECODERS[name](model, ids, mask, new_tokens, never, 0)
        for round_ in range(repeats):
            order = decoders if round_ % 2 == 0 else decoders[::-1]
            for name in order:
                _sync(device)
                start = time.perf_counter()
                out = DECODERS[name](model, ids, mask, new_tokens, never, 0)
                _sync(device)
                times[name].append(time.perf_counter() - start)
                tokens[name] = out
    return times, {k: v.cpu() for k, v in tokens.items()}


def table(records: list[dict[str, Any]], header: list[str]) -> str:
    """The markdown report: one row per (shape, batch, decoder), with the speed ratio to ``loop``."""
    lines = [*header, "", "| shape | batch | prompt tokens | decoder | s per batch (median) | generations/s | "
             "new tokens/s | × loop | same tokens as the first decoder | peak GiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    rates = {(r["shape"], r["batch"], r["decoder"]): r["generations_per_s"] for r in records if "generations_per_s" in r}
    for r in records:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['batch']} | {r['prompt_tokens']} | {r['decoder']} | {r['error']} | | | | | |")
            continue
        loop = rates.get((r["shape"], r["batch"], "loop"))
        ratio = f"{r['generations_per_s'] / loop:.2f}" if loop else "–"
        peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else "–"
        lines.append(f"| {r['shape']} | {r['batch']} | {r['prompt_tokens']} (padded {r['padded_width']}) | {r['decoder']} | "
                     f"{r['seconds_median']:.4f} | {r['generations_per_s']:,.2f} | {r['new_tokens_per_s']:,.0f} | "
                     f"{ratio} | {r['same_rows']}/{r['batch']} | {peak} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import transformers

    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    env = {"device": name, "torch": torch.__version__, "transformers": transformers.__version__, "dtype": args.dtype,
           "threads": torch.get_num_threads(), "default_decoder": DEFAULT_DECODER}
    header = ["# Evaluation throughput: `generate` vs `loop`", "",
              f"`python bench/eval_throughput.py {' '.join(argv if argv is not None else sys.argv[1:])}`", "",
              f"{env['device']}, {args.dtype}, torch {env['torch']}, transformers {env['transformers']}; "
              f"{args.new_tokens} new tokens per row, every row generates all of them (end-of-sequence id = "
              f"vocabulary size); median of {args.repeats} after {args.warmup} warm-up calls each. "
              f"Current default decoder: `{DEFAULT_DECODER}`.",
              "× loop: generations/s over the loop's on the same batch (> 1: faster than the loop)."]
    records: list[dict[str, Any]] = []
    failed = False
    for shape in args.shape_list:
        started = time.perf_counter()
        model, weights = build_model(shape, args, device, dtype)
        _sync(device)
        init_s = time.perf_counter() - started
        vocab = model.config.vocab_size
        params = sum(p.numel() for p in model.parameters())
        print(json.dumps({"shape": shape, "weights": weights, "parameters": params, "init_s": round(init_s, 2)}), flush=True)
        for batch in args.batch_sizes:
            ids, mask = make_batch(batch, args.prompt_range, vocab, 0, args.seed + batch, device)
            base = {"shape": shape, "weights": weights, "parameters": params, "batch": batch,
                    "prompt_tokens": f"{args.prompt_range[0]}-{args.prompt_range[1]}", "padded_width": ids.shape[1],
                    "new_tokens": args.new_tokens, **env}
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            try:
                times, tokens = measure(model, args.decoder_list, ids, mask, args.new_tokens, vocab, args.warmup,
                                        args.repeats, device)
            except torch.cuda.OutOfMemoryError:
                rows = [{**base, "decoder": d, "error": "out of memory"} for d in args.decoder_list]
                del ids, mask
                torch.cuda.empty_cache()
            else:
                peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
                first = tokens[args.decoder_list[0]]
                rows = []
                for d in args.decoder_list:
                    seconds = statistics.median(times[d])
                    same = int((tokens[d] == first).all(dim=1).sum()) if tokens[d].shape == first.shape else 0
                    full = tuple(tokens[d].shape) == (batch, args.new_tokens)
                    rows.append({**base, "decoder": d, "seconds_median": round(seconds, 5),
                                 "seconds": [round(t, 5) for t in times[d]],
                                 "generations_per_s": round(batch / seconds, 2),
                                 "new_tokens_per_s": round(batch * args.new_tokens / seconds, 1),
                                 "same_rows": same, "full_length": full,
                                 "peak_gib": None if peak is None else round(peak, 2)})
                    # fp32: both decoders compute the same numbers; bf16 may round a near-tie apart
                    failed |= not full or (dtype == torch.float32 and same != batch)
            records += rows
            with open(out / JSONL, "a") as f:
                for r in rows:
                    print(json.dumps(r), flush=True)
                    f.write(json.dumps(r) + "\n")
            (out / TABLE).write_text(table(records, header))
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(table(records, header), end="")
    if failed:
        print("ERROR: a decoder stopped early or (fp32) generated other tokens than the first decoder", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
