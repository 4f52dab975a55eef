"""Offline planning tools, run before a job rather than in it: the per-GPU memory model of GORP
under ZeRO-2/3 (``memory_model``, from shapes alone: no torch) and its command line
(``memory_table``; ``python -m gorp_ds.planning.memory_model``, ``gorp-ds memory``)."""
