"""The confidence (entropy) term: value and gradient against a direct computation over the full
vocabulary, the same across a TP = 2 vocabulary split, and off (weight 0) exactly today's loss."""
from __future__ import annotations

import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")

from megablock.diffusion.batch import build_batch  # noqa: E402
from megablock.diffusion.loss import block_diffusion_loss, with_confidence  # noqa: E402
from megablock.parallel.state import initialize_parallel  # noqa: E402
from megablock.testing import run_distributed  # noqa: E402

V, REAL = 48, 44  # the last 4 entries play the padded vocabulary (-inf, as the model's head makes them)


@pytest.fixture(autouse=True)
def _parallel():
    initialize_parallel(1, 1)


def _case(seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, REAL - 1, (3, 16), generator=g)
    batch = build_batch(x0, [0, 1, 2], 4, mask_token_id=REAL - 1, seed=seed)
    logits = torch.randn(3, 32, V, generator=g) * 3
    logits[..., REAL:] = float("-inf")
    logits[..., REAL - 1] = float("-inf")  # the mask token is never predicted
    sel = batch.noised_targets
    # Make some selected positions correct for sure: their target gets the top logit.
    rows = sel.nonzero()[::2]
    logits[rows[:, 0], rows[:, 1], batch.targets[rows[:, 0], rows[:, 1]]] = 20.0
    return batch, logits


def _direct(batch, logits):
    """Mean entropy over noised targets whose argmax is the target, from full-vocabulary softmax."""
    sel = batch.noised_targets
    z = logits[sel]
    correct = z.argmax(-1) == batch.targets[sel]
    # Only the finite columns (real tokens but the mask): the rest have probability exactly 0.
    rows = z[correct]
    logp = torch.log_softmax(rows[:, torch.isfinite(rows).all(0)], -1)
    ent = -(logp.exp() * logp).sum(-1)
    return ent.mean(), int(correct.sum())


def _loss(batch, logits, gamma):
    parts = block_diffusion_loss(logits, batch.targets, batch.diff_weights, batch.ar_weights, batch.diff_normalizer, 0.5)
    if not gamma:
        return parts
    sel = batch.noised_targets
    return with_confidence(parts, gamma, logits[sel], batch.targets[sel])


def test_value_and_gradient_match_a_direct_computation():
    batch, logits = _case()
    gamma = 0.3
    a = logits.clone().requires_grad_(True)
    parts = _loss(batch, a, gamma)
    expected, count = _direct(batch, logits)
    assert 0 < count < int(batch.noised_targets.sum())  # some correct, some not: the selection matters
    torch.testing.assert_close(parts.confidence_loss, expected, rtol=1e-5, atol=1e-6)
    base = _loss(batch, logits, 0.0)
    torch.testing.assert_close(parts.loss, base.loss + gamma * expected, rtol=1e-5, atol=1e-6)
    parts.loss.backward()

    b = logits.clone().requires_grad_(True)
    ref, _ = _direct(batch, b)
    (_loss(batch, b, 0.0).loss + gamma * ref).backward()
    assert torch.isfinite(a.grad).all()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)


def _objective_case():
    from megablock.inference.loading import from_hf_model
    from megablock.testing import tiny_hf_model

    model = from_hf_model(tiny_hf_model("llama", seed=0), mask_token_id=319).model
    x0 = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    return model, build_batch(x0, [0, 1], 4, mask_token_id=319, seed=0)


def test_training_objective_off_is_todays_and_on_matches_the_reference():
    """The engine's objective (head on gathered rows only): gamma = 0 is exactly the objective
    without the term; gamma > 0 equals the full-logits reference plus gamma x the direct entropy."""
    from megablock.diffusion.loss import LossWeights
    from megablock.training.engine import DiffusionObjective

    model, batch = _objective_case()
    grads = []
    for objective in (DiffusionObjective(model, LossWeights(0.5)), DiffusionObjective(model, LossWeights(0.5, 0.0))):
        model.zero_grad()
        loss = objective(batch)[0]
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    assert torch.equal(grads[0][0], grads[1][0])
    assert all(torch.equal(a, b) for a, b in zip(grads[0][1], grads[1][1]))

    gamma = 0.5
    # A random model predicts nothing right: make half the noised targets its own argmax, so the
    # term has correct rows to read (and incorrect ones to skip).
    with torch.no_grad():
        top = model(batch.input_ids, batch.position_ids, batch.layout).argmax(-1)
    rows = batch.noised_targets.nonzero()[::2]
    batch.targets[rows[:, 0], rows[:, 1]] = top[rows[:, 0], rows[:, 1]]
    model.zero_grad()
    on = DiffusionObjective(model, LossWeights(0.5, gamma))(batch)[0]
    logits = model(batch.input_ids, batch.position_ids, batch.layout)
    ref = _loss(batch, logits, 0.0).loss
    expected, count = _direct(batch, logits.detach())
    assert count > 0
    torch.testing.assert_close(on, ref + gamma * expected, rtol=1e-5, atol=1e-5)


def test_ar_mode_has_no_noised_targets():
    batch = build_batch(torch.randint(0, 40, (2, 8)), [0, 1], 1, mask_token_id=43)
    assert not batch.noised_targets.any()


def _tp_worker(rank, world, batch, logits, gamma):
    from megablock.parallel.state import initialize_parallel as init

    init(tp=world, pp=1)
    local = V // world
    part = logits[..., rank * local:(rank + 1) * local].clone().requires_grad_(True)
    parts = _loss(batch, part, gamma)
    parts.loss.backward()
    return parts.loss.detach(), parts.confidence_loss.detach(), part.grad


def test_tensor_parallel_split_gives_the_same_value_and_gradient():
    batch, logits = _case(2)
    gamma = 0.7
    full = logits.clone().requires_grad_(True)
    ref = _loss(batch, full, gamma)
    ref.loss.backward()
    results = run_distributed(_tp_worker, 2, batch, logits, gamma)
    for rank, (loss, conf, grad) in enumerate(results):
        # fp32 sums over a split vocabulary in a different order: equal up to rounding.
        torch.testing.assert_close(loss, ref.loss.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(conf, ref.confidence_loss.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, full.grad[..., rank * (V // 2):(rank + 1) * (V // 2)], rtol=1e-4, atol=1e-6)
