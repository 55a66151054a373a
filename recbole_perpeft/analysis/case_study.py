"""Case study (paper Fig. 5): one user's top-k under GlobalPEFT, under its own group's adapter and under
another group's, with titles, the held-out test item marked.

"Under GlobalPEFT" is PerPEFT's global path: the stage-1 model it was built from (global adapter and
projector, stage-1 ID embeddings and backbone), kept frozen inside the checkpoint. A group's ranking uses
that group's item table with the shared (stage-2) ID embeddings and backbone, as evaluation does. Items
the user already had before the test item (training and validation) are not ranked, as in RecBole's
full-sort evaluation. The user's input is its test-time sequence (the last ``MAX_ITEM_LIST_LENGTH`` items
before the test item)."""

from __future__ import annotations

import numpy as np
import torch
from recbole.data.interaction import Interaction

from recbole_perpeft.analysis.loading import user_item_matrix


def held_out_rows(run) -> dict[int, int]:
    """{internal user id: row of the test split}."""
    users = run.test_data._dataset.inter_feat[run.train_dataset.uid_field].numpy()
    return {int(u): i for i, u in enumerate(users)}


@torch.no_grad()
def ranking_scores(run, users: list[int], group) -> torch.Tensor:
    """[U, n_items] scores of ``users`` (internal ids) under ``group``'s model (None: the global path),
    their earlier items (and padding) at -inf."""
    model, feat = run.model, run.test_data._dataset.inter_feat
    rows = held_out_rows(run)
    missing = [u for u in users if u not in rows]
    if missing:
        raise ValueError(f"users {missing[:5]} have no test interaction in this run.")
    index = torch.tensor([rows[u] for u in users])
    batch = Interaction({k: feat[k][index] for k in feat.columns}).to(model.item_id_embedding.weight.device)
    scores = model.scores(batch, group).clone()
    seen = user_item_matrix(run.train_dataset)[users].toarray() > 0
    seen |= _in_sequence(batch[model.ITEM_SEQ].cpu().numpy(), scores.shape[1])
    seen[:, 0] = True
    scores[torch.as_tensor(seen, device=scores.device)] = -torch.inf
    return scores


def _in_sequence(sequences: np.ndarray, n_items: int) -> np.ndarray:
    marked = np.zeros((len(sequences), n_items), dtype=bool)
    rows = np.repeat(np.arange(len(sequences)), sequences.shape[1])
    marked[rows, sequences.reshape(-1)] = True
    return marked


def held_out_ranks(run, users: list[int], group_of) -> np.ndarray:
    """1-based rank of each user's test item under the group ``group_of(user)`` gives (None: global)."""
    target = run.test_data._dataset.inter_feat[run.train_dataset.iid_field].numpy()
    rows = held_out_rows(run)
    ranks = np.zeros(len(users), dtype=np.int64)
    by_group: dict = {}
    for position, user in enumerate(users):
        by_group.setdefault(group_of(user), []).append(position)
    for group, positions in by_group.items():
        chosen = [users[p] for p in positions]
        scores = ranking_scores(run, chosen, group)
        truth = torch.as_tensor(target[[rows[u] for u in chosen]])
        mine = scores[torch.arange(len(chosen)), truth]
        ranks[positions] = ((scores > mine[:, None]).sum(1) + 1).cpu().numpy()
    return ranks


def default_users(run, n_users: int = 3) -> tuple[list[int], str]:
    """One user from each of the ``n_users`` largest groups: the one whose test item ranks highest under
    its own group's adapter (lowest id on ties). Returns the users and the rule, to print beside them."""
    labels = run.groups.labels
    sizes = np.bincount(labels[labels >= 0], minlength=run.groups.n_groups)
    rows = held_out_rows(run)
    chosen = []
    for group in np.argsort(-sizes, kind="stable")[:n_users]:
        members = [u for u in np.flatnonzero(labels == group).tolist() if u in rows]
        if members:
            ranks = held_out_ranks(run, members, lambda _u, g=int(group): g)
            chosen.append(members[int(np.argmin(ranks))])
    rule = (
        f"one user from each of the {len(chosen)} largest groups: the one whose test item ranks highest under "
        "its own group's adapter (an illustration, not an average)"
    )
    return chosen, rule


def other_group(run, group: int) -> int | None:
    """The largest group other than ``group`` (None with one group)."""
    labels = run.groups.labels
    sizes = np.bincount(labels[labels >= 0], minlength=run.groups.n_groups).astype(float)
    sizes[group] = -1
    return int(np.argmax(sizes)) if run.groups.n_groups > 1 else None


def case_study(run, user: int, k: int = 10, other: int | None = None) -> dict:
    """Top-k of one user (internal id) under GlobalPEFT, its own group and ``other`` (default: the
    largest other group), with titles; ``test_item`` and each list's ``test_rank``."""
    own = int(run.groups.labels[user])
    if own < 0:
        raise ValueError(f"user {run.user_tokens[user]} has no group in this run.")
    other = other_group(run, own) if other is None else int(other)
    titles, tokens = run.titles, run.item_tokens
    feat = run.test_data._dataset.inter_feat
    row = held_out_rows(run)[user]
    test_item = int(feat[run.train_dataset.iid_field][row])
    sequence = [int(i) for i in feat[run.model.ITEM_SEQ][row].tolist() if i > 0]
    lists = [("GlobalPEFT", None), (f"own group {own}", own)]
    if other is not None:
        lists.append((f"other group {other}", other))
    rankings = []
    for name, group in lists:
        scores = ranking_scores(run, [user], group)[0]
        top = torch.topk(scores, k).indices.tolist()
        rank = int((scores > scores[test_item]).sum()) + 1
        rankings.append(
            {
                "name": name,
                "group": group,
                "items": [_entry(i, titles, tokens) for i in top],
                "item_ids": top,
                "test_rank": rank,
            }
        )
    return {
        "user": run.user_tokens[user],
        "user_id": int(user),
        "group": own,
        "test_item": _entry(test_item, titles, tokens),
        "test_item_id": test_item,
        "history": [_entry(i, titles, tokens) for i in sequence],
        "history_ids": sequence,
        "rankings": rankings,
    }


def _entry(item: int, titles, tokens) -> dict:
    return {"item": str(tokens[item]), "title": titles[item]}


def case_markdown(cases: list[dict], rule: str | None = None) -> str:
    lines = ["# Case study", ""]
    if rule:
        lines += [f"Users: {rule}.", ""]
    for case in cases:
        lines += [
            f"## User {case['user']} (group {case['group']})",
            "",
            f"Held-out test item: **{case['test_item']['title'] or case['test_item']['item']}**. Last items "
            f"before it: {'; '.join(h['title'] or h['item'] for h in case['history'][-5:])}.",
            "",
        ]
        k = len(case["rankings"][0]["items"])
        lines += [
            "| rank | " + " | ".join(f"{r['name']} (test item at {r['test_rank']})" for r in case["rankings"]) + " |",
            "|---:|" + "---|" * len(case["rankings"]),
        ]
        for position in range(k):
            cells = []
            for ranking in case["rankings"]:
                entry = ranking["items"][position]
                text = (entry["title"] or entry["item"]).replace("|", "/")
                cells.append(f"**{text}** (test item)" if entry["item"] == case["test_item"]["item"] else text)
            lines.append(f"| {position + 1} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)
