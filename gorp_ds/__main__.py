"""``python -m gorp_ds`` is the ``gorp-ds`` command (``deepspeed --module gorp_ds train …``,
``torchrun -m gorp_ds train …``)."""

from .cli import console_main

if __name__ == "__main__":
    console_main()
