"""UserLevel1 (PerPEFT paper §4.1.3, personalised-prompt style): GlobalPEFT plus a learnable
embedding per user as one more element of the user's sequence: a prompt before the items
(``personal_vector_position: start``) or after the last one (``end``)
(``recbole_perpeft.model.personalisation``)."""

from recbole_perpeft.model.personalisation import PromptPersonalVector


class UserLevel1(PromptPersonalVector):
    personal_source = "user"
