"""Export a saved checkpoint as a Hugging Face model directory, on one process:

    python -m gorp_ds.export runs/order_1/gorp runs/order_1/gorp_hf          # the method's latest checkpoint
    python -m gorp_ds.export runs/order_1/gorp/checkpoints/task02_step000000 out/   # one tag: after task 1

The checkpoint may have been written on any number of ranks. The method, model and LoRA settings
come from the checkpoint; the engine is rebuilt and the checkpoint loaded through the public
checkpoint API, then the weights are written with every LoRA merged in fp32 from the masters.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys


def _single_process_env() -> None:
    """A one-rank process group for DeepSpeed when not started by a launcher."""
    if "RANK" in os.environ:
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gorp_ds.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a method's output directory, its checkpoints/ folder, or one tag folder")
    parser.add_argument("out_dir", help="the Hugging Face directory to write (replaced if it exists)")
    args = parser.parse_args(argv)

    from ..cl.config import ConfigError
    from ..cl.restore import find_checkpoint, rebuild_session
    from ..data.errors import DataError
    from ..models import ModelError, RoleError
    from ..zero import CheckpointError, UnsupportedSetupError

    found = find_checkpoint(args.checkpoint)
    if found is None:
        print(f"gorp_ds: error: {args.checkpoint}: not a checkpoint (expected a method's output directory with "
              "checkpoints/latest, a checkpoints/ folder, or a tag folder with gorp_state/)", file=sys.stderr)
        return 2
    _single_process_env()
    import deepspeed
    import torch.distributed as dist

    try:
        if not dist.is_initialized():
            deepspeed.init_distributed()
        session = rebuild_session(*found, tasks=[], world=dist.get_world_size(),
                                  out_dir=os.path.dirname(os.path.abspath(args.out_dir)))
        session.export(args.out_dir)
        session.close()
    except (ConfigError, DataError, ModelError, RoleError, UnsupportedSetupError, CheckpointError) as err:
        print(f"gorp_ds: error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
