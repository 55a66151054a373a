"""Auxiliary losses: SDA's CMSA / InfoNCE cross-modal alignment and the in-batch cross-entropy with
popularity (logQ) correction of IISAN / CROSSAN."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from recbole_perpeft.model.losses import (
    CrossModalAlignment,
    cmsa_loss,
    inbatch_popularity_ce,
    infonce_loss,
    item_log_popularity,
)


def _unit(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=-1)


# --- CMSA / InfoNCE ---------------------------------------------------------------------------------


def test_cmsa_zero_when_distributions_coincide():
    eye = torch.eye(6, 8)  # orthonormal rows
    assert cmsa_loss(eye, eye.clone(), 0.07).abs().item() < 1e-6
    x = _unit(10, 16, 0)  # X == Y, non-orthogonal: S = XXᵀ = (XXᵀ + YYᵀ) / 2
    assert cmsa_loss(x, x.clone(), 0.1).abs().item() < 1e-6


def test_cmsa_positive_for_random_pairs():
    x, y = _unit(12, 16, 1), _unit(12, 16, 2)
    assert cmsa_loss(x, y, 0.07).item() > 1e-3


def test_cmsa_matches_hand_computed_kl():
    x, y, tau = _unit(5, 4, 3), _unit(5, 4, 4), 0.2
    s = x @ y.T / tau
    structure = (x @ x.T + y @ y.T) / 2 / tau
    t_rows, t_cols = torch.softmax(structure, dim=1), torch.softmax(structure.T, dim=1)

    def kl(target, logits):
        return (target * (target.log() - torch.log_softmax(logits, dim=1))).sum(1).mean()

    expected = (kl(t_rows, s) + kl(t_cols, s.T)) / 2
    torch.testing.assert_close(t_rows, t_cols)  # symmetric structure: both directions share one target
    torch.testing.assert_close(cmsa_loss(x, y, tau), expected)


def test_cmsa_symmetric_in_the_two_modalities():
    x, y = _unit(9, 8, 5), _unit(9, 8, 6)
    torch.testing.assert_close(cmsa_loss(x, y, 0.07), cmsa_loss(y, x, 0.07))
    torch.testing.assert_close(infonce_loss(x, y, 0.07), infonce_loss(y, x, 0.07))


def test_cmsa_target_carries_no_gradient():
    x = _unit(6, 4, 7).requires_grad_()
    y = _unit(6, 4, 8)
    cmsa_loss(x, y, 0.5).backward()
    # Only the cross-modal logits depend on x through the graph: compare with the target held fixed.
    x2 = x.detach().clone().requires_grad_()
    with torch.no_grad():
        structure = (x2 @ x2.T + y @ y.T) / 2 / 0.5
        t_rows, t_cols = torch.softmax(structure, dim=1), torch.softmax(structure.T, dim=1)
    s = x2 @ y.T / 0.5
    manual = (
        F.kl_div(torch.log_softmax(s, 1), t_rows, reduction="batchmean")
        + F.kl_div(torch.log_softmax(s.T, 1), t_cols, reduction="batchmean")
    ) / 2
    manual.backward()
    torch.testing.assert_close(x.grad, x2.grad)


def test_infonce_lower_for_aligned_than_shuffled_pairs():
    x = _unit(16, 32, 9)
    g = torch.Generator().manual_seed(10)
    y = F.normalize(x + 0.1 * torch.randn(x.shape, generator=g), dim=-1)
    perm = torch.roll(torch.arange(16), 1)  # a derangement: no item keeps its partner
    assert infonce_loss(x, y, 0.07) < infonce_loss(x, y[perm], 0.07)
    assert infonce_loss(x, y, 0.07) < math.log(16)  # better than chance


@pytest.mark.parametrize("variant", ["cmsa", "infonce"])
def test_alignment_module_gradients_reach_heads_and_temperature(variant):
    torch.manual_seed(0)
    module = CrossModalAlignment({"text": 12, "image": 20}, align_dim=8, variant=variant)
    loss = module({"text": torch.randn(7, 12), "image": torch.randn(7, 20)})
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    for name, p in module.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert module.log_tau.grad.abs().item() > 0


def test_alignment_module_uses_functional_loss():
    torch.manual_seed(1)
    vectors = {"text": torch.randn(5, 6), "image": torch.randn(5, 3)}
    for variant, fn in (("cmsa", cmsa_loss), ("infonce", infonce_loss)):
        module = CrossModalAlignment({"text": 6, "image": 3}, align_dim=4, temperature=0.1, variant=variant)
        x, y = module.project(vectors)
        torch.testing.assert_close(x.norm(dim=-1), torch.ones(5))
        torch.testing.assert_close(module(vectors), fn(x, y, module.tau))
        torch.testing.assert_close(module.tau, torch.tensor(0.1))


def test_temperature_is_clamped():
    module = CrossModalAlignment({"text": 4, "image": 4})
    with torch.no_grad():
        module.log_tau.fill_(-20.0)
    assert module.tau.item() == pytest.approx(0.01)
    with torch.no_grad():
        module.log_tau.fill_(5.0)
    assert module.tau.item() == pytest.approx(1.0)


@pytest.mark.parametrize("dims", [{"text": 4}, {"text": 4, "image": 4, "audio": 4}, {}])
def test_alignment_needs_exactly_two_modalities(dims):
    with pytest.raises(ValueError, match="exactly two modalities"):
        CrossModalAlignment(dims)


def test_alignment_rejects_bad_arguments_and_inputs():
    with pytest.raises(ValueError, match="variant"):
        CrossModalAlignment({"text": 4, "image": 4}, variant="clip")
    module = CrossModalAlignment({"text": 4, "image": 4})
    with pytest.raises(ValueError, match="modalities"):
        module({"text": torch.randn(3, 4)})
    with pytest.raises(ValueError, match="same items"):
        module({"text": torch.randn(3, 4), "image": torch.randn(2, 4)})


@pytest.mark.parametrize("n", [0, 1])
@pytest.mark.parametrize("variant", ["cmsa", "infonce"])
def test_alignment_fewer_than_two_items_is_a_finite_zero(n, variant):
    module = CrossModalAlignment({"text": 4, "image": 5}, variant=variant)
    loss = module({"text": torch.randn(n, 4), "image": torch.randn(n, 5)})
    assert loss.item() == 0.0
    loss.backward()
    for p in module.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()


# --- in-batch cross-entropy with popularity correction ----------------------------------------------


def _batch():
    g = torch.Generator().manual_seed(11)
    user = torch.randn(4, 3, generator=g)
    item_ids = torch.tensor([7, 2, 9, 4, 5])  # deliberately unsorted
    item_vectors = torch.randn(5, 3, generator=g)
    targets = torch.tensor([9, 7, 9, 5])
    columns = torch.tensor([2, 0, 2, 4])
    return user, targets, item_vectors, item_ids, columns


def test_inbatch_ce_matches_hand_computation():
    user, targets, item_vectors, item_ids, columns = _batch()
    expected = F.cross_entropy(user @ item_vectors.T, columns)
    torch.testing.assert_close(inbatch_popularity_ce(user, targets, item_vectors, item_ids, None), expected)


def test_popularity_correction_subtracts_log_p():
    user, targets, item_vectors, item_ids, columns = _batch()
    log_pop = item_log_popularity(torch.arange(12) % 4)
    corrected = inbatch_popularity_ce(user, targets, item_vectors, item_ids, log_pop)
    manual = F.cross_entropy(user @ item_vectors.T - log_pop[item_ids], columns)
    torch.testing.assert_close(corrected, manual)
    assert not torch.isclose(corrected, inbatch_popularity_ce(user, targets, item_vectors, item_ids))
    # A uniform popularity shifts every logit equally: softmax, hence the loss, is unchanged.
    uniform = torch.full((12,), -math.log(12))
    torch.testing.assert_close(
        inbatch_popularity_ce(user, targets, item_vectors, item_ids, uniform),
        inbatch_popularity_ce(user, targets, item_vectors, item_ids),
    )


def test_inbatch_ce_gradients_flow():
    user, targets, item_vectors, item_ids, _ = _batch()
    user.requires_grad_()
    item_vectors.requires_grad_()
    inbatch_popularity_ce(user, targets, item_vectors, item_ids, item_log_popularity(torch.ones(12))).backward()
    assert user.grad.abs().sum() > 0 and item_vectors.grad.abs().sum() > 0


def test_inbatch_ce_missing_target_raises():
    user, targets, item_vectors, item_ids, _ = _batch()
    targets = torch.tensor([9, 3, 9, 11])
    with pytest.raises(ValueError, match=r"\[3, 11\] are not among"):
        inbatch_popularity_ce(user, targets, item_vectors, item_ids)


def test_inbatch_ce_rejects_duplicate_candidates_and_bad_shapes():
    user, targets, item_vectors, _, _ = _batch()
    with pytest.raises(ValueError, match="distinct"):
        inbatch_popularity_ce(user, targets, item_vectors, torch.tensor([7, 9, 9, 4, 5]))
    with pytest.raises(ValueError, match="share H"):
        inbatch_popularity_ce(user, targets, item_vectors[:, :2], torch.tensor([7, 2, 9, 4, 5]))


def test_inbatch_ce_no_positions_is_a_finite_zero():
    item_vectors = torch.randn(3, 4, requires_grad=True)
    loss = inbatch_popularity_ce(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), item_vectors, torch.arange(3))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(item_vectors.grad).all()


def test_item_log_popularity_is_finite_and_normalised():
    counts = torch.tensor([0, 0, 3, 10, 1])  # padding id 0 and an unseen item have count 0
    log_p = item_log_popularity(counts)
    assert log_p.dtype == torch.get_default_dtype() and torch.isfinite(log_p).all()
    torch.testing.assert_close(log_p.exp().sum(), torch.tensor(1.0))
    torch.testing.assert_close(log_p, torch.log(torch.tensor([1.0, 1, 4, 11, 2]) / 19))
    assert log_p[3] > log_p[2] > log_p[4] > log_p[0]
    with pytest.raises(ValueError, match="non-negative"):
        item_log_popularity(torch.tensor([1, -1]))
