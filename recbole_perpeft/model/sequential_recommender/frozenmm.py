"""Frozen MM (the paper's baseline): GlobalPEFT without PEFT. The foundation model never changes,
so every item's modality vectors are computed once (cached on disk); only the projector, ID
embeddings and SASRec train."""

from recbole_perpeft.model.sequential_recommender.globalpeft import GlobalPEFT


class FrozenMM(GlobalPEFT):
    adapt_foundation = False
