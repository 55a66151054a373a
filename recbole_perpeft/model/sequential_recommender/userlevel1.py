"""UserLevel1 (PerPEFT paper §4.1.3, personalised-prompt style): GlobalPEFT plus a learnable
embedding per user, appended to the user's sequence at position ``item_length``; the encoder's
output there is the user's representation (``recbole_perpeft.model.personalisation``)."""

from recbole_perpeft.model.personalisation import AppendPersonalVector


class UserLevel1(AppendPersonalVector):
    personal_source = "user"
