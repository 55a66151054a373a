"""RecBole's SequentialDataset plus the paper's preprocessing knobs, raw item modalities and input checks."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import torch
from recbole.data.dataset import SequentialDataset
from recbole.utils import FeatureSource, FeatureType

import recbole_perpeft.data.checks as checks
from recbole_perpeft.data.checks import plural


class MultimodalSequentialDataset(SequentialDataset):
    """Seeded user subsampling before RecBole's (iterative) k-core filtering, and only items that
    survive filtering in the item universe. Used for every sequential model, RecBole's included, so
    comparisons see the same users and items.

    Input checks (``checks.py``): a malformed atomic file is refused with its file, line and value; an
    item of the .inter that the .item lacks keeps its interactions (no text, a learned placeholder)
    unless ``filter_inter_by_user_or_item: True`` is set explicitly; duplicated interactions and
    repeated .item rows are reported; a dataset that filtering empties names the settings that did it."""

    # --- loading ------------------------------------------------------------------------------------

    def _get_preset(self):
        super()._get_preset()
        self._line_maps = {}  # source -> checks.LineMap of the file it was read from
        self._filter_steps = []  # (what, setting, interactions before, after) of each step that removed some

    def _load_feat(self, filepath, source):
        load_col, _ = self._get_load_and_unload_col(source)
        if load_col == set():
            return None
        sep, encoding = self.config["field_separator"], self.config["encoding"]
        name = os.path.basename(filepath)
        is_inter = source == FeatureSource.INTERACTION
        what = {FeatureSource.INTERACTION: "interactions", FeatureSource.ITEM: "items", FeatureSource.USER: "users"}
        header = checks.read_header(filepath, sep, encoding, what.get(source, "rows"))
        if is_inter:
            checks.require_columns(filepath, header, {"USER_ID_FIELD": self.uid_field, "ITEM_ID_FIELD": self.iid_field})
            checks.require_float_time(filepath, header, self.time_field, load_col)
            if self.time_field and load_col and self.time_field in load_col and self.time_field not in dict(header):
                self.logger.warning(
                    f"{name} has no column '{self.time_field}' (TIME_FIELD, listed in load_col; {filepath}): each "
                    "user's interactions are taken in the order of the file."
                )
        elif source in (FeatureSource.ITEM, FeatureSource.USER):
            if source == FeatureSource.ITEM:
                checks.require_columns(filepath, header, {"ITEM_ID_FIELD": self.iid_field})
            else:
                checks.require_columns(filepath, header, {"USER_ID_FIELD": self.uid_field})
        # Fewer fields than the header in a .inter line is a broken interaction; in a .item or .user it is
        # trailing missing values, which RecBole fills as it fills any missing value.
        scan = checks.scan_rows(filepath, sep, encoding, len(header), refuse_fewer=is_inter)
        if is_inter and scan.rows == 0:
            raise ValueError(f"{name} has no interactions ({filepath}): it has a header line only.")
        if source in (FeatureSource.ITEM, FeatureSource.USER) and scan.rows == 0:
            raise ValueError(
                f"{name} has no {what[source]} ({filepath}): it has a header line only; add one line per "
                f"{what[source][:-1]}, or leave '{source.value}' out of load_col."
            )
        try:
            feat = super()._load_feat(filepath, source)
        except ValueError as err:
            raise checks.explain_load_error(
                filepath, sep, encoding, self.config["seq_separator"] or " ", header, err
            ) from None
        if feat is None:
            return None
        self._line_maps[source] = scan.lines
        if is_inter:
            self._check_timestamps(feat, filepath, scan.lines)
        elif source in (FeatureSource.ITEM, FeatureSource.USER):
            self._note_repeated_rows(feat, filepath, source, scan.lines)
        return feat

    def _check_timestamps(self, feat, filepath, lines):
        """An empty timestamp would be filled with the column's mean by RecBole, moving the interaction
        to the middle of its user's sequence."""
        time = self.time_field
        if not time or time not in feat or self.field2type.get(time) != FeatureType.FLOAT:
            return
        missing = np.flatnonzero(feat[time].isna().to_numpy())
        if len(missing):
            raise ValueError(
                f"{os.path.basename(filepath)} line {lines(int(missing[0]))} has no {time} "
                f"({plural(len(missing), 'such line')}; {filepath}): every interaction needs one (sequences are "
                "ordered by it); fill it in or remove these lines."
            )

    def _dataframe_to_interaction(self, data):
        """RecBole's, but the time field stays float64: RecBole's float32 rounds Unix seconds to 64-second
        steps (886324817 -> 886324992), which reorders a user's interactions wherever sequences are sorted."""
        inter = super()._dataframe_to_interaction(data)
        time = self.time_field
        if time and time in data and self.field2type.get(time) == FeatureType.FLOAT:
            if time not in (self.config["numerical_features"] or []):
                inter[time] = torch.from_numpy(data[time].to_numpy(dtype=np.float64, copy=True))
        return inter

    def _note_repeated_rows(self, feat, filepath, source, lines):
        id_field = self.iid_field if source == FeatureSource.ITEM else self.uid_field
        if id_field not in feat:
            return
        ids = feat[id_field]
        repeated = np.flatnonzero(ids.duplicated(keep="first").to_numpy() & ids.notna().to_numpy())
        if len(repeated):
            kind = "items" if source == FeatureSource.ITEM else "users"
            self.logger.warning(
                f"{os.path.basename(filepath)} lists {plural(len(repeated), kind[:-1], kind)} more than once "
                f"(first repeat: line {lines(int(repeated[0]))}): the first line of each is used, the "
                f"{plural(len(repeated), 'repeat')} ignored."
            )

    def _load_data(self, token, dataset_path):
        super()._load_data(token, dataset_path)
        if self.inter_feat is None:  # RecBole reads no .inter when load_col has no 'inter' entry
            raise ValueError(
                f"load_col has no 'inter' entry (load_col: {self.config['load_col']}), so {token}.inter is not read: "
                "add e.g. inter: [user_id, item_id, timestamp] (a misspelt key?)."
            )
        self._note_duplicated_interactions()
        self._note_missing_rows(self.item_feat, self.iid_field, "item")
        self._note_missing_rows(self.user_feat, self.uid_field, "user")

    def _inter_line(self, row: int) -> str:
        lines = self._line_maps.get(FeatureSource.INTERACTION)
        return f"line {lines(row)}" if lines is not None and self.benchmark_filename_list is None else f"row {row + 1}"

    def _note_duplicated_interactions(self):
        feat = self.inter_feat
        key = [f for f in (self.uid_field, self.iid_field, self.time_field) if f and f in feat]
        if len(key) < 2:
            return
        duplicated = np.flatnonzero(feat.duplicated(subset=key, keep="first").to_numpy())
        if not len(duplicated):
            return
        same = "user, item and timestamp" if self.time_field in key else "user and item"
        keep = self.config["rm_dup_inter"]
        if keep is None:
            done = "kept, as RecBole does (set rm_dup_inter: first to drop repeated user-item pairs)"
        else:
            done = f"dropped by rm_dup_inter={keep}, with every other repeat of a user-item pair"
        self.logger.warning(
            f"{self.dataset_name}.inter has {plural(len(duplicated), 'duplicated interaction')} (same {same} as an "
            f"earlier line; first: {self._inter_line(int(duplicated[0]))}): {done}."
        )

    def _drops_missing(self) -> bool:
        """RecBole's filter_inter_by_user_or_item (our overall.yaml turns RecBole's default True off: it
        dropped every interaction with an item the .item lacks)."""
        return self.config["filter_inter_by_user_or_item"] is True

    def _note_missing_rows(self, feat, id_field, kind):
        """Users/items of the .inter without a line in the .user/.item."""
        if feat is None or id_field not in feat or id_field not in self.inter_feat:
            return
        ids = self.inter_feat[id_field]
        missing_mask = ~ids.isin(feat[id_field]) & ids.notna()
        if not missing_mask.any():
            return
        missing = pd.unique(ids[missing_mask])
        n_ids = ids.nunique()
        file = f"{self.dataset_name}.{kind}"
        examples = ", ".join(map(repr, missing[:3].tolist())) + (", ..." if len(missing) > 3 else "")
        if len(missing) == n_ids:
            listed = feat[id_field].dropna()
            theirs = ", ".join(map(repr, listed[:3].tolist())) + (", ..." if len(listed) > 3 else "")
            raise ValueError(
                f"none of the {plural(n_ids, kind)} of {self.dataset_name}.inter (e.g. {examples}) is in {file} "
                f"({plural(len(listed), kind)}, e.g. {theirs}): the two files must use the same {id_field} values."
            )
        counts = f"{plural(len(missing), kind)} of {self.dataset_name}.inter are missing from {file} (" + (
            f"{plural(int(missing_mask.sum()), 'interaction')}; e.g. {examples})"
        )
        if self._drops_missing():
            done = "their interactions are dropped (filter_inter_by_user_or_item: True)"
        elif kind == "item":
            done = (
                "kept, without text or image (learned placeholders)"
                if self.config["image_field"]
                else ("kept, without text (a learned placeholder); their images are looked up in image_dir as usual")
            )
        else:
            done = "kept, with empty user features"
        self.logger.warning(f"{counts}: {done}.")

    # --- filtering ----------------------------------------------------------------------------------

    def _data_filtering(self):
        feat = self.inter_feat
        self._loaded = (len(feat), feat[self.uid_field].nunique(), feat[self.iid_field].nunique())
        self._sample_users()
        super()._data_filtering()  # ends with _reset_index, which refuses an emptied dataset
        if self.item_feat is not None:
            # Items nobody interacts with after filtering cannot be targets; RecBole would still rank them.
            keep = self.item_feat[self.iid_field].isin(self.inter_feat[self.iid_field])
            dropped = int((~keep).sum())
            if dropped:
                self.logger.info(f"Dropping {dropped} items of {self.dataset_name}.item with no interaction left.")
                self.item_feat = self.item_feat[keep].reset_index(drop=True)

    def _step(self, what: str, before: int, advice: str) -> int:
        """Record a filtering step that removed interactions, for the message if none are left;
        ``advice``: what to do if it is the step that removed the last of them."""
        removed = before - len(self.inter_feat)
        if removed:
            self._filter_steps.append((what, advice, before, len(self.inter_feat)))
        return removed

    def _sample_users(self):
        ratio = self.config["user_sample_ratio"]
        if ratio is None or ratio >= 1:
            return
        before = len(self.inter_feat)
        users = np.sort(self.inter_feat[self.uid_field].dropna().unique())
        n_keep = max(1, int(round(len(users) * ratio)))
        rng = np.random.default_rng(self.config["seed"])
        kept = rng.choice(users, size=n_keep, replace=False)
        # Index labels stay the rows of the .inter (for line numbers); _reset_index renumbers after filtering.
        ids = self.inter_feat[self.uid_field]
        dropped = ~ids.isin(kept) & ids.notna()  # lines without a user go in _filter_nan_user_or_item, with a warning
        self.inter_feat.drop(self.inter_feat.index[dropped.to_numpy()], inplace=True)
        self._step(
            f"user_sample_ratio={ratio} kept {n_keep:,} of {len(users):,} users",
            before,
            "Use a larger user_sample_ratio",
        )
        self.logger.info(
            f"user_sample_ratio={ratio}: kept {n_keep} of {len(users)} users (seed {self.config['seed']})."
        )

    def _filter_nan_user_or_item(self):
        """RecBole's, with one warning per file (count and first line) instead of every line number."""
        for field, kind in ((self.uid_field, "user"), (self.iid_field, "item")):
            feat = getattr(self, f"{kind}_feat")
            if feat is not None and field in feat:
                empty = np.flatnonzero(feat[field].isna().to_numpy())
                if len(empty):
                    lines = self._line_maps.get(FeatureSource.USER if kind == "user" else FeatureSource.ITEM)
                    row = int(feat.index[empty[0]])  # the row of the file: RecBole drops repeats in place
                    first = f"line {lines(row)}" if lines else f"row {row + 1}"
                    self.logger.warning(
                        f"{self.dataset_name}.{kind}: {plural(len(empty), 'line')} without {field} (first: "
                        f"{first}): ignored."
                    )
                    feat.drop(feat.index[empty], inplace=True)
            if field is not None and field in self.inter_feat:
                empty = np.flatnonzero(self.inter_feat[field].isna().to_numpy())
                if len(empty):
                    self.logger.warning(
                        f"{self.dataset_name}.inter: {plural(len(empty), 'interaction')} without {field} (first: "
                        f"{self._inter_line(int(self.inter_feat.index[empty[0]]))}): dropped."
                    )
                    before = len(self.inter_feat)
                    self.inter_feat.drop(self.inter_feat.index[empty], inplace=True)
                    self._step(f"lines without {field}", before, f"Fill in {field} in {self.dataset_name}.inter")

    def _remove_duplication(self):
        before = len(self.inter_feat)
        super()._remove_duplication()
        removed = self._step(f"rm_dup_inter={self.config['rm_dup_inter']}", before, "Unset rm_dup_inter")
        if removed:
            self.logger.info(
                f"rm_dup_inter={self.config['rm_dup_inter']}: dropped "
                f"{plural(removed, 'repeated user-item interaction')} of {self.dataset_name}.inter."
            )

    def _filter_by_field_value(self):
        before = len(self.inter_feat)
        super()._filter_by_field_value()
        self._step(f"val_interval={self.config['val_interval']}", before, "Loosen val_interval")

    def _filter_inter_by_user_or_item(self):
        # Only when asked for explicitly; the missing users/items were reported when loading.
        if self._drops_missing():
            before = len(self.inter_feat)
            super()._filter_inter_by_user_or_item()
            self._step(
                "filter_inter_by_user_or_item=True",
                before,
                f"Unset filter_inter_by_user_or_item, or list the items in {self.dataset_name}.item",
            )

    def _filter_by_inter_num(self):
        before = len(self.inter_feat)
        super()._filter_by_inter_num()
        self._step(
            f"user_inter_num_interval={self.config['user_inter_num_interval']} and item_inter_num_interval="
            f"{self.config['item_inter_num_interval']} (iterated)",
            before,
            'Loosen user_inter_num_interval / item_inter_num_interval (lower bounds, e.g. "[1,inf)")',
        )

    def _reset_index(self):
        """RecBole's, but an empty result gets the filter settings that emptied it; an empty .item or .user
        table is fine (their items/users keep their interactions, without features)."""
        if self.inter_feat.empty:
            raise ValueError(self._emptied_message())
        for feat_name in self.feat_name_list:
            getattr(self, feat_name).reset_index(drop=True, inplace=True)

    def _emptied_message(self) -> str:
        n_inter, n_users, n_items = getattr(self, "_loaded", (0, 0, 0))
        parts = []
        for what, _, before, after in self._filter_steps:
            if what.startswith("user_sample_ratio"):
                parts.append(f"{what} ({plural(after, 'interaction')})")
            else:
                parts.append(f"{what} removed {'the remaining ' if after == 0 else ''}{before - after:,}")
        advice = self._filter_steps[-1][1] if self._filter_steps else "Check the filter settings"
        if any(what.startswith("user_sample_ratio") for what, *_ in self._filter_steps[:-1]):
            advice += ", or use a larger user_sample_ratio"
        return (
            f"after filtering, {self.dataset_name} has no interactions left (0 users, 0 items): loaded "
            f"{plural(n_inter, 'interaction')} of {plural(n_users, 'user')} and {plural(n_items, 'item')}; "
            f"{'; '.join(parts) or 'no filter removed any'}. {advice}."
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
