"""RecBole's SequentialDataset plus the paper's preprocessing knobs and raw item modalities."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
from recbole.data.dataset import SequentialDataset
from recbole.utils import FeatureType


class MultimodalSequentialDataset(SequentialDataset):
    """Seeded user subsampling before RecBole's (iterative) k-core filtering, and only items that
    survive filtering in the item universe. Used for every sequential model, RecBole's included, so
    comparisons see the same users and items."""

    def _data_filtering(self):
        self._sample_users()
        super()._data_filtering()
        if self.item_feat is not None:
            # Items nobody interacts with after filtering cannot be targets; RecBole would still rank them.
            keep = self.item_feat[self.iid_field].isin(self.inter_feat[self.iid_field])
            dropped = int((~keep).sum())
            if dropped:
                self.logger.info(f"Dropping {dropped} items of {self.dataset_name}.item with no interaction left.")
                self.item_feat = self.item_feat[keep].reset_index(drop=True)

    def _sample_users(self):
        ratio = self.config["user_sample_ratio"]
        if ratio is None or ratio >= 1:
            return
        users = np.sort(self.inter_feat[self.uid_field].unique())
        n_keep = max(1, int(round(len(users) * ratio)))
        rng = np.random.default_rng(self.config["seed"])
        kept = rng.choice(users, size=n_keep, replace=False)
        self.inter_feat = self.inter_feat[self.inter_feat[self.uid_field].isin(kept)].reset_index(drop=True)
        self.logger.info(
            f"user_sample_ratio={ratio}: kept {n_keep} of {len(users)} users (seed {self.config['seed']})."
        )

    # --- raw modalities, by internal item id (0 is padding) -----------------------------------------

    def _item_interaction(self):
        """``item_feat`` as an Interaction: it stays a DataFrame until ``build()`` (run by data_preparation)."""
        feat = self.item_feat
        return self._dataframe_to_interaction(feat) if isinstance(feat, pd.DataFrame) else feat

    def item_texts(self) -> list[str]:
        """Each item's text ('' where missing) from the ``text_field`` of the .item file."""
        field = self.config["text_field"]
        texts = [""] * self.item_num
        if not field or self.item_feat is None or field not in self.item_feat:
            return texts
        ftype = self.field2type[field]
        id2token = self.field2id_token.get(field)  # token fields only; others are rejected below
        feat = self._item_interaction()
        values = feat[field].numpy()
        items = feat[self.iid_field].numpy()
        sep = self.config["seq_separator"] or " "
        for item, value in zip(items, values, strict=True):
            if ftype == FeatureType.TOKEN_SEQ:
                texts[item] = sep.join(id2token[t] for t in value if t > 0)
            elif ftype == FeatureType.TOKEN:
                texts[item] = id2token[value] if value > 0 else ""
            else:
                raise ValueError(
                    f"text_field '{field}' of {self.dataset_name}.item has type {ftype.value}; declare it "
                    "as token_seq or token in the .item header."
                )
        return [t.strip() for t in texts]

    def item_image_paths(self) -> list[str | None]:
        """Each item's image path: ``image_field`` of the .item file if set, else
        ``image_dir/<image_name_format>`` by item token. None for the padding item."""
        paths: list[str | None] = [None] * self.item_num
        tokens = self.field2id_token[self.iid_field]
        field = self.config["image_field"]
        if field:
            if self.item_feat is None or field not in self.item_feat:
                raise ValueError(
                    f"image_field '{field}' is not a column of {self.dataset_name}.item; add it "
                    "(and list it in load_col) or unset image_field to use image_dir."
                )
            id2path = self.field2id_token[field]
            feat = self._item_interaction()
            for item, value in zip(feat[self.iid_field].numpy(), feat[field].numpy(), strict=True):
                if value > 0:
                    paths[item] = os.path.join(self.config["data_path"], id2path[value])
            return paths
        pattern = self.config["image_name_format"] or "{item_id}.jpg"
        for item in range(1, self.item_num):
            paths[item] = os.path.join(self.config["image_dir"], pattern.format(item_id=tokens[item]))
        return paths
