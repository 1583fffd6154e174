"""The cosine head: logits bounded by the scale and blind to the embedding's norm (so no client can
sharpen its softmax by growing the model), identical in the one-by-one and vectorized training paths,
and used by central training too."""

import pytest
import torch

from fedemb.training.logits import class_logits


def test_cosine_logits_are_bounded_by_the_scale_and_ignore_the_norms():
    torch.manual_seed(0)
    emb, weight = torch.randn(6, 5), torch.randn(3, 5)
    logits = class_logits(emb, weight, "cosine", 16.0)
    assert logits.shape == (6, 3) and logits.abs().max() <= 16.0 + 1e-5
    torch.testing.assert_close(class_logits(40.0 * emb, 0.1 * weight, "cosine", 16.0), logits)
    expected = 16.0 * torch.nn.functional.cosine_similarity(emb[:, None], weight[None], dim=-1)
    torch.testing.assert_close(logits, expected)


def test_dot_logits_are_the_linear_heads_and_grow_with_the_embedding():
    torch.manual_seed(0)
    emb, weight = torch.randn(6, 5), torch.randn(3, 5)
    torch.testing.assert_close(class_logits(emb, weight, "dot", 16.0), emb @ weight.T)
    torch.testing.assert_close(class_logits(2 * emb, weight, "dot", 16.0), 2 * emb @ weight.T)


def test_stacked_heads_broadcast_per_client():
    torch.manual_seed(0)
    emb, heads = torch.randn(4, 6, 5), torch.randn(4, 3, 5)  # 4 clients
    stacked = class_logits(emb, heads, "cosine", 8.0)
    for i in range(4):
        torch.testing.assert_close(stacked[i], class_logits(emb[i], heads[i], "cosine", 8.0))


def test_an_all_zero_padded_class_row_gives_finite_logits():
    logits = class_logits(torch.randn(2, 5), torch.zeros(3, 5), "cosine", 16.0)
    assert torch.isfinite(logits).all() and (logits == 0).all()


def test_a_cosine_head_client_loss_stays_bounded_when_the_model_grows():
    """The quickstart's failure: a dot head's loss on a wrong example grows with the model's scale; a
    cosine head's cannot pass log(C) + 2s."""
    emb, weight = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    wrong = torch.tensor([1])
    losses = {kind: [float(torch.nn.functional.cross_entropy(class_logits(g * emb, weight, kind, 4.0), wrong))
                     for g in (1.0, 10.0, 100.0)] for kind in ("dot", "cosine")}
    assert losses["dot"][2] > 100 * losses["dot"][0] / 2
    assert losses["cosine"][0] == pytest.approx(losses["cosine"][2])
    assert max(losses["cosine"]) <= torch.log(torch.tensor(2.0)) + 2 * 4.0
