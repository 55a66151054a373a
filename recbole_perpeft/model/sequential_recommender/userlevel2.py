"""UserLevel2 (PerPEFT paper §4.1.3, SSE-PT style): GlobalPEFT plus a learnable embedding per user,
concatenated with every item vector and projected back to hidden_size (``Linear(2H, H)``) before
SASRec (``recbole_perpeft.model.personalisation``)."""

from recbole_perpeft.model.personalisation import ConcatPersonalVector


class UserLevel2(ConcatPersonalVector):
    personal_source = "user"
