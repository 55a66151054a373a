"""Top-k recommendations by item token, and the exported model that serves them with torch alone.

:class:`TokenRecommender` turns user and item tokens into scores and back: a known user (a token of the run's
dataset) is scored from its whole stored history, a new one from the item tokens given, both in batches;
``exclude_seen`` drops the user's items. How a batch is scored is a subclass's: the full model
(recbole_perpeft/recommend.py) or :class:`TableRecommender`, the export of ``recbole-perpeft export``
(recbole_perpeft/export.py): every group's item table, the SASRec encoder's weights, the grouping and the
known users' histories in ``model.safetensors``, tokens and sizes in ``recommender.json``.

This module imports neither RecBole nor transformers, nor the encoders or adapters, so an export serves
where none of them is installed. The SASRec encoder is therefore rebuilt from ``torch.nn``'s own
Transformer layers (post-norm, as RecBole's), and a new user's group is computed here by the grouping's
rule (K-Means: nearest centre; GMM: most likely component; random: the grouping's seeded draw), since
``recbole_perpeft.grouping`` needs scikit-learn."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

FORMAT = "recbole_perpeft.recommender/1"
META_FILE, WEIGHTS_FILE = "recommender.json", "model.safetensors"
ACTIVATIONS = ("gelu", "relu")  # RecBole's hidden_act values torch's layers compute the same way


@dataclass
class Recommendation:
    items: list[str]  # item tokens, best first
    scores: list[float]
    group: int | None = None  # the interest group that scored the user (PerPEFT), else None


@dataclass
class Request:
    """One resolved query: ``user`` an internal id (0: a new user), ``history`` internal item ids."""

    user: int
    history: list[int]


class TokenRecommender:
    """Tokens in, tokens out. A subclass sets the attributes below and implements :meth:`score`."""

    item_tokens: list[str]  # by internal id; id 0 is padding
    user_tokens: list[str]
    histories: torch.Tensor  # [n_users, L] each known user's last L items, oldest first, left-aligned
    lengths: torch.Tensor  # [n_users]
    seen_indptr: torch.Tensor  # CSR of every item each known user has (also beyond the last L)
    seen_indices: torch.Tensor
    max_seq_length: int
    batch_size: int = 256

    def _index(self) -> None:
        self.item_index = {t: i for i, t in enumerate(self.item_tokens) if i > 0}
        self.user_index = {t: i for i, t in enumerate(self.user_tokens) if i > 0}
        self.token_array = np.array(self.item_tokens, dtype=object)

    # --- the public API -----------------------------------------------------------------------------

    def recommend(self, user=None, history=None, k: int = 10, exclude_seen: bool = True):
        """Top-``k`` item tokens and scores. ``user``: a known user's token (scored from its stored history
        unless ``history`` is given, always in its own group); ``history``: item tokens, oldest first (a new
        user without ``user``). A list of users, or a list of histories, gives a list of results."""
        many = isinstance(user, (list, tuple)) or (
            isinstance(history, (list, tuple)) and history and isinstance(history[0], (list, tuple))
        )
        if not many:
            return self.recommend_requests([self.resolve(user, history)], k, exclude_seen)[0]
        if user is not None and not isinstance(user, (list, tuple)):
            raise ValueError("a list of histories takes a list of users (one per history), or none.")
        users = list(user) if user is not None else [None] * len(history)
        histories = list(history) if history is not None else [None] * len(users)
        if len(users) != len(histories):
            raise ValueError(f"{len(users)} users but {len(histories)} histories: give one history per user.")
        return self.recommend_requests([self.resolve(u, h) for u, h in zip(users, histories, strict=True)], k,
                                       exclude_seen)  # fmt: skip

    def resolve(self, user=None, history=None) -> Request:
        """A :class:`Request`, or ValueError with one line naming what is wrong."""
        uid = 0
        if user is not None:
            uid = self.user_index.get(str(user), 0)
            if not uid:
                raise ValueError(f"unknown user token {str(user)!r} (not a user of the run's dataset after "
                                 f"filtering; e.g. {self.user_tokens[1:4]}).")  # fmt: skip
        if history is None:
            if not uid:
                raise ValueError("give a user token or a history of item tokens.")
            return Request(uid, [])
        if isinstance(history, (str, bytes)) or not isinstance(history, (list, tuple)):
            raise ValueError(f"a history is a list of item tokens, got {history!r}.")
        if not history:
            raise ValueError("empty history: give at least one item token (or only the user token).")
        unknown = [str(t) for t in history if str(t) not in self.item_index]
        if unknown:
            raise ValueError(f"unknown item token(s) {unknown[:5]} in the history (not items of the run's dataset "
                             f"after filtering; e.g. {self.item_tokens[1:4]}).")  # fmt: skip
        return Request(uid, [self.item_index[str(t)] for t in history])

    @torch.no_grad()
    def recommend_requests(self, requests: list[Request], k: int = 10, exclude_seen: bool = True,
                           progress=None) -> list[Recommendation]:  # fmt: skip
        """Resolved requests, ``batch_size`` at a time; ``progress`` (a tqdm bar) is advanced per batch."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}.")
        out = []
        for start in range(0, len(requests), self.batch_size):
            batch = requests[start : start + self.batch_size]
            out += self._recommend_batch(batch, min(k, len(self.item_tokens) - 1), exclude_seen)
            if progress is not None:
                progress.update(len(batch))
        return out

    # --- one batch ----------------------------------------------------------------------------------

    def _recommend_batch(self, batch: list[Request], k: int, exclude_seen: bool) -> list[Recommendation]:
        users = torch.tensor([r.user for r in batch], dtype=torch.long)
        seqs, lengths = self.sequences(batch)
        stored = torch.tensor([not r.history for r in batch], dtype=torch.bool)  # scored from the stored history
        scores, groups = self.score(users, seqs, lengths, stored)
        scores = scores.float().cpu()
        scores[:, 0] = -torch.inf  # padding
        if exclude_seen:
            rows, items = self.seen_pairs(batch)
            scores[rows, items] = -torch.inf
        top = torch.topk(scores, k, dim=1)
        # (tokens gathered for the whole batch at once: per-item Python lookups cost more than the matmul)
        tokens = self.token_array[top.indices.numpy()].tolist()
        values = top.values.tolist()
        groups = [None] * len(batch) if groups is None else groups.tolist()
        if bool((top.values == -torch.inf).any()):  # fewer unseen items than k: drop the masked ones
            keep = [[j for j, v in enumerate(row) if v != -np.inf] for row in values]
            tokens = [[row[j] for j in kept] for row, kept in zip(tokens, keep, strict=True)]
            values = [[row[j] for j in kept] for row, kept in zip(values, keep, strict=True)]
        return [Recommendation(*row) for row in zip(tokens, values, groups, strict=True)]

    def sequences(self, batch: list[Request]) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, max_seq_length] left-aligned histories (a request's own, else the user's stored one) and lengths."""
        users = torch.tensor([r.user for r in batch], dtype=torch.long)
        seqs, lengths = self.histories[users].clone(), self.lengths[users].clone()
        given = [i for i, r in enumerate(batch) if r.history]
        if given:
            width = self.max_seq_length
            rows = [batch[i].history[-width:] for i in given]
            seqs[given] = torch.tensor([h + [0] * (width - len(h)) for h in rows], dtype=torch.long)
            lengths[given] = torch.tensor([len(h) for h in rows], dtype=torch.long)
        return seqs, lengths

    def seen_pairs(self, batch: list[Request]) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, items) of every item a request's user has (CSR rows gathered at once) or its history holds."""
        users = torch.tensor([r.user for r in batch], dtype=torch.long)
        starts, counts = self.seen_indptr[users], self.seen_indptr[users + 1] - self.seen_indptr[users]
        rows = torch.repeat_interleave(torch.arange(len(batch)), counts)
        offsets = torch.arange(int(counts.sum())) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
        items = self.seen_indices[torch.repeat_interleave(starts, counts) + offsets]
        given = [(i, item) for i, r in enumerate(batch) for item in r.history]
        if given:
            extra = torch.tensor(given, dtype=torch.long)
            rows, items = torch.cat([rows, extra[:, 0]]), torch.cat([items, extra[:, 1]])
        return rows, items

    def score(self, users: torch.Tensor, seqs: torch.Tensor, lengths: torch.Tensor, stored: torch.Tensor):
        """([B, n_items] scores, [B] groups or None) of a batch (``users`` 0: new; ``stored``: the rows whose
        sequence is the known user's stored history, not one given with the request)."""
        raise NotImplementedError


def seen_csr(n_users: int, users: np.ndarray, items: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(indptr, indices): each user's distinct items, from (user, item) pairs."""
    pairs = np.unique(np.stack([users, items], axis=1), axis=0) if len(users) else np.zeros((0, 2), dtype=np.int64)
    indptr = np.zeros(n_users + 1, dtype=np.int64)
    np.add.at(indptr, pairs[:, 0] + 1, 1)
    return torch.from_numpy(np.cumsum(indptr)), torch.from_numpy(pairs[:, 1].astype(np.int64))


# --- the exported model ------------------------------------------------------------------------------------


class SequenceEncoder(nn.Module):
    """SASRec's encoder in ``torch.nn`` layers: position embedding, LayerNorm, post-norm Transformer layers
    under a causal mask; the state at each sequence's last item. Weights come from RecBole's layout
    (export.py maps them); dropout is off (serving)."""

    def __init__(self, hidden_size: int, n_layers: int, n_heads: int, inner_size: int, hidden_act: str,
                 layer_norm_eps: float, max_seq_length: int):  # fmt: skip
        super().__init__()
        if hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {hidden_act!r} cannot be served by torch's layers; one of {ACTIVATIONS}.")
        self.position = nn.Embedding(max_seq_length, hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(hidden_size, n_heads, inner_size, dropout=0.0, activation=hidden_act,
                                       layer_norm_eps=layer_norm_eps, batch_first=True)  # fmt: skip
            for _ in range(n_layers)
        )

    def forward(self, item_vectors: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        width = item_vectors.shape[1]
        x = self.norm(item_vectors + self.position.weight[:width])
        # Left-aligned sequences: under the causal mask the last item never sees padding.
        mask = torch.full((width, width), -torch.inf, device=x.device).triu(diagonal=1)
        for layer in self.layers:
            x = layer(x, src_mask=mask)
        return x[torch.arange(len(x), device=x.device), lengths - 1]


class TableRecommender(TokenRecommender):
    """An exported model: item tables (``global``, and one per group for PerPEFT) and the SASRec encoders
    that read them (``global``; PerPEFT's groups share ``groups``)."""

    def __init__(self, meta: dict, weights: dict[str, torch.Tensor]):
        self.meta = meta
        self.item_tokens, self.user_tokens = list(meta["item_tokens"]), list(meta["user_tokens"])
        self.max_seq_length = int(meta["encoder"]["max_seq_length"])
        self._index()
        self.encoders = {}
        for name in meta["encoders"]:
            encoder = SequenceEncoder(**meta["encoder"])
            prefix = f"encoder.{name}."
            encoder.load_state_dict({k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)})
            self.encoders[name] = encoder.eval()
        self.tables = {k[len("table.") :]: v for k, v in weights.items() if k.startswith("table.")}
        self.histories, self.lengths = weights["users.histories"], weights["users.lengths"]
        self.seen_indptr, self.seen_indices = weights["users.seen_indptr"], weights["users.seen_indices"]
        # (an export written before these were stored encodes every user)
        self.user_vectors, self.precomputed = weights.get("users.vectors"), weights.get("users.precomputed")
        self.grouping = meta.get("grouping")
        self.group_of_user = weights.get("grouping.labels")
        self.group_weights = {k[len("grouping.") :]: v for k, v in weights.items() if k.startswith("grouping.")}

    @classmethod
    def load(cls, directory: str) -> TableRecommender:
        from safetensors.torch import load_file

        meta_file = os.path.join(directory, META_FILE)
        try:
            with open(meta_file) as f:
                meta = json.load(f)
        except (OSError, ValueError) as err:
            raise ValueError(f"{meta_file} cannot be read ({err}): give a folder `recbole-perpeft export` wrote.") \
                from None
        if meta.get("format") != FORMAT:
            raise ValueError(f"{meta_file} is format {meta.get('format')!r}, this version reads {FORMAT!r}.")
        return cls(meta, load_file(os.path.join(directory, WEIGHTS_FILE)))

    def _user_vectors(self, encoder: str, table: str, seqs, lengths) -> torch.Tensor:
        width = int(lengths.max())  # (positions past the longest history change nothing)
        return self.encoders[encoder](self.tables[table][seqs[:, :width]], lengths)

    def score(self, users, seqs, lengths, stored):
        # A known user's vector from its stored history was computed at export (export.known_user_vectors,
        # the full model's own path): it is one matmul; only the other rows run the encoder.
        cached = torch.zeros(len(users), dtype=torch.bool)
        if self.user_vectors is not None:
            cached = stored & self.precomputed[users]
        vectors = torch.empty(len(users), self.tables["global"].shape[1])
        if cached.any():
            vectors[cached] = self.user_vectors[users[cached]]
        encode = ~cached
        if self.grouping is None:
            if encode.any():
                vectors[encode] = self._user_vectors("global", "global", seqs[encode], lengths[encode])
            return vectors @ self.tables["global"].T, None
        groups = self.group_of_user[users].clone()
        new = (users == 0) | (groups < 0)  # (a user left out of the grouping is served as new, as the full model)
        if new.any():
            interest = self._user_vectors("global", "global", seqs[new], lengths[new])
            groups[new] = self.assign(interest)
        scores = torch.empty(len(users), len(self.item_tokens))
        for group in groups.unique().tolist():
            rows, table = groups == group, f"group.{group}"
            if (rows & encode).any():
                vectors[rows & encode] = self._user_vectors("groups", table, seqs[rows & encode],
                                                            lengths[rows & encode])  # fmt: skip
            scores[rows] = vectors[rows] @ self.tables[table].T
        return scores, groups

    def assign(self, vectors: torch.Tensor) -> torch.Tensor:
        """Groups of new users' interest vectors, by the rule of ``UserGroups.assign`` (grouping.py)."""
        method, n_groups = self.grouping["method"], int(self.grouping["n_groups"])
        if method == "kmeans":
            x, c = vectors.double(), self.group_weights["centers"].double()
            return torch.argmin((c * c).sum(1)[None, :] - 2.0 * x @ c.T, dim=1)
        if method == "gmm":
            from torch.distributions import MultivariateNormal

            w = self.group_weights
            mixture = MultivariateNormal(w["gmm_means"].double(), covariance_matrix=w["gmm_covariances"].double())
            log_prob = mixture.log_prob(vectors.double()[:, None, :]) + w["gmm_weights"].double().log()
            return torch.argmax(log_prob, dim=1)
        if method == "random":  # the model assigns one user at a time: the seed's first draw
            group = int(np.random.default_rng(int(self.grouping["seed"])).integers(n_groups, size=1)[0])
            return torch.full((len(vectors),), group, dtype=torch.long)
        raise ValueError(f"unknown grouping method {method!r} in the export.")
