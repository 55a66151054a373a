"""Who is in each interest group (paper Fig. 7a, footnotes 2-3): sizes, distinctive title words, top items.

Read off the training split (no validation or test item): a user "has" a word when some item of its
training sequence has the word in its title. For group c and word w, ``share_c(w)`` is the fraction of
the group's users who have it and ``share(w)`` the fraction of all grouped users. A word is distinctive
for c when it is both common in c and rarer elsewhere; words are ranked by

    score_c(w) = share_c(w) · log2(share_c(w) / share(w))

(the word's term in the divergence of the group's word shares from everyone's: 70% vs 9% scores 2.07,
95% vs 90% 0.07, 20% vs 1% 0.86). Title words come from scikit-learn's ``CountVectorizer`` (lower case,
letters only, at least ``min_word_length`` of them, English stop words removed). Items are ranked the same
way over "has the item", and, for ``top_items``, by the share of the group's users alone."""

from __future__ import annotations

import numpy as np
from sklearn.feature_extraction.text import CountVectorizer

from recbole_perpeft.analysis.loading import user_item_matrix


def _shares(presence, labels: np.ndarray, n_groups: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """([C, V] share of each group's users with each column, [V] share over all grouped users, [C] sizes)."""
    presence = presence.tocsr()
    grouped = labels >= 0
    sizes = np.bincount(labels[grouped], minlength=n_groups)
    per_group = np.vstack([np.asarray(presence[labels == c].sum(0)).ravel() for c in range(n_groups)])
    overall = per_group.sum(0) / max(int(sizes.sum()), 1)
    return per_group / np.maximum(sizes, 1)[:, None], overall, sizes


def distinctiveness(share_group: np.ndarray, share_all: np.ndarray) -> np.ndarray:
    """score = share_c · log2(share_c / share) (0 where the group has none)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        score = share_group * np.log2(share_group / share_all)
    return np.where(share_group > 0, score, 0.0)


def title_words(titles: list[str], min_word_length: int = 3):
    """(binary [n_items, V] item-word matrix, vocabulary) of the titles."""
    vectorizer = CountVectorizer(
        binary=True, lowercase=True, stop_words="english", token_pattern=rf"(?u)\b[^\W\d_]{{{min_word_length},}}\b"
    )
    try:
        matrix = vectorizer.fit_transform(titles)
    except ValueError:  # no word at all (no titles)
        return None, np.array([], dtype=object)
    return matrix, vectorizer.get_feature_names_out()


def group_profiles(train_dataset, groups, top_words: int = 8, top_items: int = 5, min_share: float = 0.05) -> dict:
    """Per group: size, distinctive title words, most distinctive and most common items (a JSON-able dict).
    ``min_share``: a word or item needs at least this share of the group's users to be listed."""
    labels = np.asarray(groups.labels)
    n_groups = groups.n_groups
    titles = train_dataset.item_texts()
    item_tokens = train_dataset.field2id_token[train_dataset.iid_field]
    has_item = user_item_matrix(train_dataset)
    item_share, item_overall, sizes = _shares(has_item, labels, n_groups)
    words, vocabulary = title_words(titles)
    if words is not None:
        has_word = (has_item @ words) > 0
        word_share, word_overall, _ = _shares(has_word, labels, n_groups)
    profiles = []
    for c in range(n_groups):
        profile = {"group": c, "users": int(sizes[c]), "share_of_users": float(sizes[c] / max(sizes.sum(), 1))}
        if words is not None:
            score = np.where(word_share[c] >= min_share, distinctiveness(word_share[c], word_overall), -np.inf)
            order = [w for w in np.argsort(-score, kind="stable")[:top_words] if np.isfinite(score[w])]
            profile["words"] = [
                {
                    "word": str(vocabulary[w]),
                    "group_share": float(word_share[c, w]),
                    "overall_share": float(word_overall[w]),
                    "score": float(score[w]),
                }
                for w in order
            ]
        else:
            profile["words"] = []
        score = np.where(item_share[c] >= min_share, distinctiveness(item_share[c], item_overall), -np.inf)
        score[0] = -np.inf
        common = np.argsort(-item_share[c], kind="stable")
        profile["distinctive_items"] = [
            _item(i, titles, item_tokens, item_share[c], item_overall)
            for i in np.argsort(-score, kind="stable")[:top_items]
            if np.isfinite(score[i])
        ]
        profile["top_items"] = [
            _item(i, titles, item_tokens, item_share[c], item_overall) for i in common[common > 0][:top_items]
        ]
        profiles.append(profile)
    return {
        "method": groups.method,
        "n_groups": n_groups,
        "sizes": sizes.tolist(),
        "users_grouped": int(sizes.sum()),
        "scoring": "score = share_c * log2(share_c / share_all) over users with the word (item) in a training item",
        "groups": profiles,
    }


def _item(item: int, titles, tokens, share_group, share_all) -> dict:
    return {
        "item": str(tokens[item]),
        "title": titles[item],
        "group_share": float(share_group[item]),
        "overall_share": float(share_all[item]),
    }


def profiles_markdown(profiles: dict, dataset: str = "") -> str:
    """The profiles as Markdown: one row per group, words as "word 70% vs 9%"."""
    lines = [
        f"# Interest groups{' of ' + dataset if dataset else ''}",
        "",
        f"{profiles['n_groups']} groups ({profiles['method']}), {profiles['users_grouped']} users. Shares: "
        "of the group's users who have a training item whose title has the word (or the item), against all "
        "users; ranked by share_c · log2(share_c / share).",
        "",
        "| group | users | distinctive title words (group vs overall) | distinctive items | most common items |",
        "|---:|---:|---|---|---|",
    ]
    for profile in profiles["groups"]:
        words = ", ".join(f"{w['word']} {w['group_share']:.0%} vs {w['overall_share']:.0%}" for w in profile["words"])
        distinctive = "; ".join(
            f"{_short(i['title'] or i['item'])} ({i['group_share']:.0%} vs {i['overall_share']:.0%})"
            for i in profile["distinctive_items"]
        )
        common = "; ".join(f"{_short(i['title'] or i['item'])} ({i['group_share']:.0%})" for i in profile["top_items"])
        lines.append(f"| {profile['group']} | {profile['users']} | {words} | {distinctive} | {common} |")
    return "\n".join(lines) + "\n"


def _short(text: str, length: int = 40) -> str:
    text = text.replace("|", "/")
    return text if len(text) <= length else text[: length - 1] + "…"
