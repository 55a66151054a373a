"""eval_exclude_history: a user's own past items leave its full ranking (training items at validation,
training + validation items at test), the target always kept, for one of our models (WithoutMM) and for
RecBole's SASRec alike, through RecBole's own full-sort step (Trainer._full_sort_batch_eval)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from recbole.utils import init_seed

from recbole_perpeft.data import create_dataset, data_preparation
from recbole_perpeft.data.history_mask import HistoryMaskedFullSortEvalDataLoader, user_items
from recbole_perpeft.utils import get_model, get_trainer

SMALL = {"hidden_size": 16, "inner_size": 32, "n_heads": 2, "train_batch_size": 8, "eval_batch_size": 7}
K = 5


@pytest.fixture
def repeat_dataset(build_toy_dataset):
    """The toy dataset, where u1's test target is its first item and u2's validation target its first item
    (bought again), so a target that is also a past item exists at both stages."""
    data = build_toy_dataset()
    path = data.folder / f"{data.name}.inter"
    lines = path.read_text().splitlines()
    header, rows = lines[0], [line.split("\t") for line in lines[1:]]
    by_user = {}
    for user, item, stamp in rows:
        by_user.setdefault(user, []).append((item, float(stamp)))
    u1, u2 = by_user["u1"], by_user["u2"]
    u1[-1] = (u1[0][0], u1[-1][1])  # test target = first item
    u2[-2] = (u2[0][0], u2[-2][1])  # validation target = first item
    path.write_text("\n".join([header] + [f"{u}\t{i}\t{t}" for u, seq in by_user.items() for i, t in seq]) + "\n")
    data.sequences["u1"], data.sequences["u2"] = [i for i, _ in u1], [i for i, _ in u2]
    return data


def evaluation(model_name, data, toy_config, in_tmp_path, **overrides):
    config = toy_config(model_name, data, **{**SMALL, **overrides})
    init_seed(config["seed"], True)
    model_class = get_model(model_name)
    train_data, valid_data, test_data = data_preparation(config, create_dataset(config), model_class)
    init_seed(config["seed"], True)
    model = model_class(config, train_data._dataset)
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    return config, trainer, valid_data, test_data


def ranked(trainer, loader):
    """{user token: (scores [n_items], top-K item tokens, target token)} from the trainer's full-sort step."""
    dataset = loader._dataset
    trainer.model.eval()
    trainer.tot_item_num = dataset.item_num
    out = {}
    with torch.no_grad():
        for batch in loader:
            interaction, scores, _, positive_i = trainer._full_sort_batch_eval(batch)
            top = scores.topk(K, dim=1).indices
            for row, uid in enumerate(interaction[dataset.uid_field].tolist()):
                user = dataset.id2token(dataset.uid_field, uid)
                items = dataset.id2token(dataset.iid_field, top[row].numpy())
                target = dataset.id2token(dataset.iid_field, int(positive_i[row]))
                out[user] = (scores[row].clone(), list(items), target)
    return out


@pytest.mark.parametrize("model_name", ["WithoutMM", "SASRec"])
def test_past_items_never_in_the_top_k_and_the_target_always_rankable(repeat_dataset, toy_config, in_tmp_path,
                                                                       model_name):  # fmt: skip
    data = repeat_dataset
    config, trainer, valid_data, test_data = evaluation(model_name, data, toy_config, in_tmp_path,
                                                        eval_exclude_history=True)  # fmt: skip
    assert isinstance(valid_data, HistoryMaskedFullSortEvalDataLoader)
    assert isinstance(test_data, HistoryMaskedFullSortEvalDataLoader)
    dataset = test_data._dataset
    for stage, loader, past in (("valid", valid_data, slice(None, -2)), ("test", test_data, slice(None, -1))):
        results = ranked(trainer, loader)
        assert set(results) == set(data.sequences)
        for user, (scores, top, target) in results.items():
            history = set(data.sequences[user][past])
            assert target == data.sequences[user][-2 if stage == "valid" else -1]
            assert not (set(top) - {target}) & history, (stage, user)
            ids = dataset.token2id(dataset.iid_field, sorted(history - {target}))
            assert torch.isinf(scores[ids]).all() and (scores[ids] < 0).all(), (stage, user)
            assert torch.isfinite(scores[dataset.token2id(dataset.iid_field, target)]), (stage, user)
            # everything else is ranked: only padding and the past items are masked
            assert int(torch.isinf(scores).sum()) == 1 + len(history - {target}), (stage, user)
    # the repeated targets: in the user's history and still rankable
    test = ranked(trainer, test_data)
    assert test["u1"][2] in data.sequences["u1"][:-1]
    valid = ranked(trainer, valid_data)
    assert valid["u2"][2] in data.sequences["u2"][:-2]
    # a whole evaluation through the trainer gives the metrics
    result = trainer.evaluate(test_data, load_best_model=False)
    assert set(result) == {"hit@5", "ndcg@5"}


@pytest.mark.parametrize("model_name", ["WithoutMM", "SASRec"])
def test_off_by_default_past_items_are_ranked(repeat_dataset, toy_config, in_tmp_path, model_name):
    """RecBole's behaviour (the recbole preset): nothing but padding is masked, and the untrained models put
    some past items in some top-K (so the masked test above has something to remove)."""
    data = repeat_dataset
    config, trainer, _, test_data = evaluation(model_name, data, toy_config, in_tmp_path)
    assert config["eval_exclude_history"] is False
    assert not isinstance(test_data, HistoryMaskedFullSortEvalDataLoader)
    results = ranked(trainer, test_data)
    assert all(int(torch.isinf(scores).sum()) == 1 for scores, _, _ in results.values())
    assert any(set(top) & set(data.sequences[user][:-1]) for user, (_, top, _) in results.items())


def test_user_items_reads_inputs_and_targets(repeat_dataset, toy_config, in_tmp_path):
    config, _, valid_data, test_data = evaluation("WithoutMM", repeat_dataset, toy_config, in_tmp_path)
    dataset = test_data._dataset
    matrix = user_items(valid_data._dataset)
    for user, seq in repeat_dataset.sequences.items():
        row = matrix[dataset.token2id(dataset.uid_field, user)]
        # the validation rows hold the last MAX_ITEM_LIST_LENGTH training items and the validation target
        expected = set(seq[:-2][-config["MAX_ITEM_LIST_LENGTH"]:]) | {seq[-2]}
        assert set(dataset.id2token(dataset.iid_field, row.indices)) == expected
        assert np.all(row.data == 1)


def test_a_non_boolean_value_is_refused(toy_dataset, toy_config, in_tmp_path):
    with pytest.raises(ValueError, match="eval_exclude_history must be True"):
        evaluation("WithoutMM", toy_dataset, toy_config, in_tmp_path, eval_exclude_history="yes")
