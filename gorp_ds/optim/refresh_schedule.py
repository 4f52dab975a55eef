"""Which ``full`` tensor refreshes its projector at which step (docs/algorithm.md §2.1): pure functions.

Two schedules (``refresh_schedule``, one per param group):

- ``cycle`` (the default): every member refreshes at steps ``0, T, 2T, …`` of its task, all in the
  same step (that step stalls: every layer's range finder at once).
- ``spread``: the ``L`` members of a param group, in the group's ``names`` order (the order
  ``build_param_groups`` lists the model's modules, so layer by layer), get a phase
  ``p_j = ⌊j·T / L⌋`` (``j = 0 … L−1``): contiguous blocks of ``⌊L/T⌋`` or ``⌈L/T⌉`` members share a
  phase (``L ≥ T``), or members are spread evenly over the cycle (``L < T``). A member refreshes at
  step ``s`` of its task when ``s = 0`` (every member needs a projector before its first update) or
  ``s mod T = p_j``. So step 0 of a task refreshes all members as ``cycle`` does; every later step
  at most ``⌈L/T⌉``; and any ``T`` consecutive steps from step 1 on refresh each member exactly once.

``cycle`` is ``spread`` with every phase 0. ``s`` is the member's own step counter within the task
(reset by ``end_task``, saved in checkpoints), so the schedule is a pure function of saved state
and a resume continues it exactly; the phases depend only on the group's names and ``T``, never on
the world size or on how members are batched or partitioned over ranks.

Plain Python: no torch, no distributed imports; the single-process optimizer and every ZeRO path
ask these functions.
"""

from __future__ import annotations

REFRESH_SCHEDULES = ("cycle", "spread")


def refresh_phases(count: int, update_gap: int, schedule: str) -> list[int]:
    """Phase ``p_j`` in ``[0, T)`` of each of the ``count`` members of a group (``T = update_gap``)."""
    if schedule not in REFRESH_SCHEDULES:
        raise ValueError(f"refresh_schedule must be one of {REFRESH_SCHEDULES}, got {schedule!r}")
    if count < 0 or update_gap < 1:
        raise ValueError(f"need count >= 0 and update_gap >= 1, got {count}, {update_gap}")
    if schedule == "cycle":
        return [0] * count
    return [j * update_gap // count for j in range(count)]


def refresh_due(step: int, phase: int, update_gap: int) -> bool:
    """Does a member of phase ``phase`` refresh at step ``step`` (0-based, within its task)?"""
    return step == 0 or step % update_gap == phase


def refresh_index(step: int, phase: int, update_gap: int) -> int:
    """The number of the refresh at ``step`` (a refresh step of that phase) within the task: 0 at
    step 0, then 1, 2, … Seeds the range finder's test matrix (``projector.projector_seed``); with
    phase 0 it is ``step // T``, what ``cycle`` has always used."""
    if step == 0:
        return 0
    return (step - phase) // update_gap + (1 if phase else 0)
