"""The optimizer's settings: GORP's hyperparameters, one default each (the run file's
``optimizer:`` section). ``GORP``'s constructor and :class:`~gorp_ds.optim.update.UpdateConfig`
take their defaults from here. Plain Python: no torch, no distributed imports."""

from __future__ import annotations

from dataclasses import dataclass

from ..settings import SettingError, check_settings, setting
from .refresh_schedule import REFRESH_SCHEDULES
from .schedule import SCHEDULE_KINDS, SCHEDULE_ROLES, SCHEDULE_SCOPES

PROJECTOR_CHOICES = ("randomized", "exact")  # projector.PROJECTOR_METHODS (that module needs torch)
MAX_SCALE = 100.0  # a --scale above this is a typo or an overflow in the making, not a GaLore scale
MAX_POWER_ITERS = 100  # more is a typo: accuracy stops improving after a few, the cost (2 GEMMs each) does not


@dataclass(kw_only=True)
class OptimizerConfig:
    """GORP's hyperparameters (docs/algorithm.md §5 gives the LLaMA-2-7B values used as defaults)."""

    rank: int = setting(8, "k: rank of the projected gradient space of full-rank targets", minimum=1, on_resume="fixed")
    update_gap: int = setting(20, "T: optimizer steps between projector refreshes", minimum=1)
    # docs/algorithm.md §2.1. Stays "cycle" until a GPU quality check shows "spread" within sampling error.
    refresh_schedule: str = setting("cycle", "(ours) when full-rank targets refresh their projectors: cycle (all at "
                                             "steps 0, T, 2T, … of a task) or spread (all at step 0, then each layer "
                                             "at its own phase of the cycle: at most ceil(L/T) layers per step)",
                                    choices=REFRESH_SCHEDULES)
    scale: float = setting(0.25, "s: multiplies the full-rank targets' low-rank update (change --lr-full for "
                                 "larger steps)", above=0.0, maximum=MAX_SCALE)
    projector: str = setting("randomized", "how projectors are computed from the gradient: randomized range "
                                           "finder or exact SVD", choices=PROJECTOR_CHOICES, on_resume="fixed")
    oversample: int = setting(8, "extra columns of the randomized range finder (ignored by the exact projector)",
                              minimum=0)
    # At most MAX_POWER_ITERS: each iteration costs two GEMMs per projector refresh, and a handful
    # already reach the accuracy of the exact SVD.
    power_iters: int = setting(2, "power iterations of the randomized range finder (each costs two GEMMs per "
                                  f"refresh; at most {MAX_POWER_ITERS})", minimum=0, maximum=MAX_POWER_ITERS)
    align_projector: bool = setting(True, "(ours) rotate each refreshed projector to the basis closest to the "
                                          "previous one, so Adam's moments stay in consistent coordinates")
    shared_threshold: float = setting(0.9, "ε_S: energy fraction of Adam's first moment kept in the shared "
                                           "space S at a task's end (0: no shared space)", minimum=0.0, maximum=1.0)
    lr_lora: float = setting(2e-4, "learning rate of the LoRA factors", minimum=0.0)
    lr_full: float = setting(1e-6, "learning rate of the full-rank targets", minimum=0.0)
    lr_plain: float = setting(1e-5, "learning rate of seq-ft (every tensor, plain AdamW)", minimum=0.0)
    # The learning-rate schedule (gorp_ds/optim/schedule.py): every group scaled from its own --lr-*.
    lr_schedule: str = setting("constant", "learning-rate schedule of every param group, each from its own --lr-*: "
                                           "constant, or linear / cosine decay towards --lr-min-ratio × its rate; "
                                           "after --lr-warmup-steps (or --lr-warmup-ratio) of linear warmup",
                               choices=SCHEDULE_KINDS)
    lr_warmup_steps: int = setting(0, "optimizer steps of linear warmup at the start of each schedule (update k of "
                                      "W uses (k+1)/W of the rate); at most the steps of a task (--lr-schedule-scope "
                                      "task) or of the sequence", minimum=0)
    lr_warmup_ratio: float = setting(0.0, "warmup as a fraction of each schedule's steps (rounded to a step), "
                                          "instead of --lr-warmup-steps", minimum=0.0, maximum=1.0)
    lr_min_ratio: float = setting(0.0, "where linear and cosine decay end, as a fraction of each group's rate "
                                       "(ignored by constant)", minimum=0.0, maximum=1.0)
    lr_schedule_scope: str = setting("task", "task: the schedule restarts at every task, over that task's steps; "
                                             "sequence: one schedule over the whole task sequence (every task's "
                                             "steps together)", choices=SCHEDULE_SCOPES)
    lr_schedule_roles: list[str] = setting(list(SCHEDULE_ROLES), "param-group roles whose rate follows "
                                           "--lr-schedule (the others keep theirs): lora_a, lora_b (gorp's and "
                                           "galore's LoRA factors), full (full-rank targets), plain (every other "
                                           "trained tensor: seq-ft, and the other methods' LoRA factors)",
                                           choices=SCHEDULE_ROLES)
    lr_later_ratio: float = setting(1.0, "factor on the rate of every --lr-schedule-roles group from the second "
                                         "task on (1: every task alike; O-LoRA's LLaMA recipe, 1e-3 then 1e-4: 0.1; "
                                         "no effect on mtl's one mixed task)", minimum=0.0, maximum=1.0)
    beta1: float = setting(0.9, "Adam's first-moment decay", minimum=0.0)
    beta2: float = setting(0.999, "Adam's second-moment decay", minimum=0.0)
    eps: float = setting(1e-8, "Adam's denominator epsilon", minimum=0.0)
    weight_decay: float = setting(0.0, "decoupled weight decay (AdamW)", minimum=0.0)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        check_settings(self, "optimizer")
        for name in ("beta1", "beta2"):
            if not getattr(self, name) < 1.0:
                raise SettingError(name, f"must be in [0, 1), got {getattr(self, name)}", "optimizer")
        if isinstance(self.lr_schedule_roles, list) and not self.lr_schedule_roles:
            raise SettingError("lr_schedule_roles", "is empty; name at least one role, or use --lr-schedule "
                               "constant for fixed rates", "optimizer")
        if self.lr_warmup_steps and self.lr_warmup_ratio:
            raise SettingError("lr_warmup_steps", f"{self.lr_warmup_steps} and {{lr_warmup_ratio}} "
                               f"{self.lr_warmup_ratio} both set the warmup; give one of them", "optimizer",
                               others=("lr_warmup_ratio",))

    @property
    def betas(self) -> tuple[float, float]:
        return (self.beta1, self.beta2)


DEFAULTS = OptimizerConfig()
