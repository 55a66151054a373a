"""GroupLevel2 (PerPEFT paper §4.1.3): UserLevel2 with one embedding per interest group instead of
per user, concatenated with every item vector and projected back (``Linear(2H, H)``). The groups are
PerPEFT's (K-Means on the trained GlobalPEFT's interest vectors): a two-stage model
(``recbole_perpeft.two_stage``) whose stage 2 starts from the GlobalPEFT (``load_global``)."""

from recbole_perpeft.model.personalisation import ConcatPersonalVector, GroupPersonalisation


class GroupLevel2(GroupPersonalisation, ConcatPersonalVector):
    pass
