"""The interactions of :class:`MultimodalSequentialDataset` as a general (non-sequential) model reads them.

Our general models (LATTICE, BM3: recbole_perpeft/model/general_recommender/) are compared with the
sequential ones, so they must see the same users, items and split: the same seeded user subsample, the
same k-core filtering, the same item universe (and item modalities), the same leave-one-out targets. This
class is the sequential dataset without RecBole's sequence augmentation: one row per interaction, as
RecBole's general loaders and its history-masked full-sort evaluation expect. RecBole's own general models
(BPR, ...) keep RecBole's Dataset (``create_dataset``)."""

from __future__ import annotations

from recbole.data.dataset import Dataset

from recbole_perpeft.data.dataset import MultimodalSequentialDataset


class MultimodalGeneralDataset(MultimodalSequentialDataset):
    def _change_feat_format(self):
        # SequentialDataset's adds the item_id_list windows (one row per prefix, the first item of each
        # user never a row): a general model trains on every training interaction instead.
        Dataset._change_feat_format(self)

    def inter_matrix(self, form="coo", value_field=None):
        # SequentialDataset's rebuilds the first items its augmentation dropped; here nothing was dropped.
        return Dataset.inter_matrix(self, form, value_field)
