"""Run under a launcher (``deepspeed --num_gpus 2 tests/support/engine_weights.py …``): for each
``checkpoint weights.pt export_dir`` triple, rebuild the checkpoint's engine on this launch's ranks
(as ``--eval-only`` does: the current LoRA merged in place), save the engine's own bf16 weights
(rank 0; the Hugging Face keys, LoRA tensors left out) and export the same engine on every rank.

The export test compares the two bit for bit: the weights the engine evaluates with against the
weights the export writes."""

from __future__ import annotations

import os
import sys

import torch


def dump_and_export(checkpoint: str, weights_out: str, export_out: str) -> None:
    import torch.distributed as dist

    from gorp_ds.cl.restore import find_checkpoint, rebuild_session

    session = rebuild_session(*find_checkpoint(checkpoint), tasks=[], world=dist.get_world_size(),
                              out_dir=os.path.dirname(os.path.abspath(export_out)))
    session.merge_in_place()
    module = session.engine.module
    core = module.get_base_model() if hasattr(module, "get_base_model") else module
    if dist.get_rank() == 0:
        state = {key.replace(".base_layer.", "."): value.detach().cpu().clone()
                 for key, value in core.state_dict().items() if ".lora_" not in key}
        torch.save(state, weights_out)
    session.export(export_out)
    session.close()


def main(argv: list[str]) -> None:
    import torch.distributed as dist

    from gorp_ds.cl.process_group import init_process_group

    argv = [a for a in argv if not a.startswith("--local_rank")]
    init_process_group()
    for i in range(0, len(argv), 3):
        dump_and_export(*argv[i:i + 3])
    dist.destroy_process_group()  # before the interpreter's teardown, which gloo's threads may abort


if __name__ == "__main__":
    main(sys.argv[1:])
