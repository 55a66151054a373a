"""SharedGroupPEFT: PerPEFT's stage 2 with one shared adapter (a control; not in the paper).

PerPEFT changes two things in stage 2 at once: every interest group gets its own adapter and
projector, and training moves to group-homogeneous batches whose negatives come from the group's
items (harder negatives). This model keeps the second and drops the first: stage 1 is the same
GlobalPEFT, stage 2 continues it for ``stage2_epochs`` on PerPEFT's batches and negatives, with the one
global adapter, projector and item table. PerPEFT minus SharedGroupPEFT is what per-group adapters add
beyond the group negatives."""

from __future__ import annotations

from recbole_perpeft.model.personalisation import TwoStageGrouped
from recbole_perpeft.model.sequential_recommender.globalpeft import GlobalPEFT


class SharedGroupPEFT(TwoStageGrouped, GlobalPEFT):
    """Continues the trained GlobalPEFT as it is (every key from its state); the groups only shape
    the batches and negatives."""
