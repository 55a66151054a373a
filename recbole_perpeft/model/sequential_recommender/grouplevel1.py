"""GroupLevel1 (PerPEFT paper §4.1.3): UserLevel1 with one embedding per interest group instead of
per user (a prompt before the items, or after them: ``personal_vector_position``). The groups are
PerPEFT's (K-Means on the trained GlobalPEFT's interest vectors): a two-stage model
(``recbole_perpeft.two_stage``) whose stage 2 starts from the GlobalPEFT (``load_global``) and trains
on group-homogeneous batches."""

from recbole_perpeft.model.personalisation import GroupPersonalisation, PromptPersonalVector


class GroupLevel1(GroupPersonalisation, PromptPersonalVector):
    pass
