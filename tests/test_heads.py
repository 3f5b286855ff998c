import math
import re

import pytest
import torch
import torch.nn.functional as F

from ensemble.errors import UserError
from ensemble.heads import HEADS, MarginHead, create_head

S, M = 30.0, 0.5
COS30 = math.sqrt(3) / 2


def _at(*degrees, r=1.0):
    """2-D points at the given angles (degrees) and radius."""
    rad = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return (r * torch.stack([rad.cos(), rad.sin()], dim=1)).float()


def _head(kind, centres, **kwargs):
    """A 2-D head whose weight rows are set by hand; norms differ on purpose (the head normalises)."""
    head = create_head(kind, 2, 3, scale=S, margin=M, **kwargs)
    with torch.no_grad():
        head.weight.copy_(centres * torch.linspace(0.5, 3.0, len(centres))[:, None])
    return head


# Classes at 0, 90 and 180 degrees; the embedding sits at 60 degrees: cosines 0.5, cos 30, -0.5.
CLASSES = _at(0, 90, 180)


def test_arcface_adds_the_margin_to_the_target_angle():
    logits = _head("arcface", CLASSES)(_at(60, r=4.0), torch.tensor([0]))
    expected = [S * math.cos(math.radians(60) + M), S * COS30, -S * 0.5]
    torch.testing.assert_close(logits, torch.tensor([expected]))


def test_cosface_subtracts_the_margin_from_the_target_cosine():
    logits = _head("cosface", CLASSES)(_at(60, r=4.0), torch.tensor([1]))
    torch.testing.assert_close(logits, torch.tensor([[S * 0.5, S * (COS30 - M), -S * 0.5]]))


def test_arcface_past_pi_minus_m_continues_linearly():
    # 160 degrees from class 0 is past pi - m (151.4 degrees): cos - sin(pi - m) * m, not cos(theta + m).
    # There cos(theta + m) rises again (170 would beat 160); the line keeps a worse angle lower.
    # 20 degrees from class 2 in the same batch takes the ordinary branch.
    logits = _head("arcface", CLASSES)(_at(160, 170, 160), torch.tensor([0, 0, 2]))
    for row, degrees in enumerate((160, 170)):
        cos = math.cos(math.radians(degrees))
        assert logits[row, 0].item() == pytest.approx(S * (cos - math.sin(math.pi - M) * M), rel=1e-6)
    assert math.cos(math.radians(170) + M) > math.cos(math.radians(160) + M)
    assert logits[1, 0] < logits[0, 0]
    assert logits[2, 2].item() == pytest.approx(S * math.cos(math.radians(20) + M), rel=1e-6)


@pytest.mark.parametrize("kind", ["arcface", "cosface"])
def test_no_margin_without_labels(kind):
    logits = _head(kind, CLASSES)(_at(60, r=4.0))
    torch.testing.assert_close(logits, torch.tensor([[S * 0.5, S * COS30, -S * 0.5]]))


def test_subcenter_takes_the_best_subcentre_of_each_class():
    # Class c owns rows 2c and 2c+1. From 60 degrees: class 0 at 0/50 -> cos 10; class 1 at 90/180 -> cos 30;
    # class 2 at 270/120 -> cos 60.
    head = _head("subcenter", _at(0, 50, 90, 180, 270, 120), subcenters=2)
    assert head.weight.shape == (6, 2)
    cos = [math.cos(math.radians(a)) for a in (10, 30, 60)]
    torch.testing.assert_close(head(_at(60)), S * torch.tensor([cos]))
    with_margin = [S * math.cos(math.radians(10) + M), S * cos[1], S * cos[2]]
    torch.testing.assert_close(head(_at(60), torch.tensor([0])), torch.tensor([with_margin]))


def test_softmax_is_a_plain_linear_layer_and_ignores_labels():
    head = create_head("softmax", 2, 3)
    with torch.no_grad():
        head.fc.weight.copy_(torch.tensor([[1.0, 2.0], [0.0, -1.0], [3.0, 0.5]]))
        head.fc.bias.copy_(torch.tensor([0.5, 0.0, -1.0]))
    x = torch.tensor([[2.0, 1.0]])
    torch.testing.assert_close(head(x), torch.tensor([[4.5, -1.0, 5.5]]))
    torch.testing.assert_close(head(x, torch.tensor([0])), head(x))


def test_bad_kind_lists_the_heads():
    message = "The 'head' parameter must be one of ['softmax', 'arcface', 'cosface', 'subcenter']. Got 'x' instead."
    with pytest.raises(UserError, match=re.escape(message)):
        MarginHead(8, 3, kind="x")
    with pytest.raises(UserError, match=re.escape(message)):
        create_head("x", 8, 3)


@pytest.mark.parametrize("kind", HEADS)
def test_gradients_reach_weights_and_embeddings(kind):
    torch.manual_seed(0)
    head = create_head(kind, 4, 3)
    emb = torch.randn(6, 4)
    if kind != "softmax":
        emb[0] = head.weight[0].detach()  # exactly on a class centre: cos = 1, where sqrt(1 - cos^2) has an infinite slope
    emb.requires_grad_(True)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    F.cross_entropy(head(emb, labels), labels).backward()
    for grad in (emb.grad, *(p.grad for p in head.parameters())):
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("kind", HEADS)
def test_float16_under_autocast_gives_float32_logits(kind):
    torch.manual_seed(0)
    head = create_head(kind, 4, 3)
    emb = (300 * torch.randn(5, 4)).half()  # large: their squared norms overflow float16 (max 65504)
    labels = torch.tensor([0, 1, 2, 0, 1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head(emb, labels)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    torch.testing.assert_close(logits, head(emb.float(), labels))


def _nearest_centre_accuracy(embed, x_train, y_train, x_test, y_test):
    """Held-out accuracy of the nearest class centre (mean normalised training embedding), by cosine."""
    with torch.no_grad():
        train_emb, test_emb = F.normalize(embed(x_train)), F.normalize(embed(x_test))
    centres = F.normalize(torch.stack([train_emb[y_train == c].mean(0) for c in range(3)]))
    return ((test_emb @ centres.T).argmax(1) == y_test).float().mean().item()


@pytest.mark.parametrize("kind", ["arcface", "cosface", "subcenter"])
def test_short_training_separates_three_clusters(kind):
    # 3 Gaussian clusters in 8-D -> Linear embedding (4-D) -> head, 100 full-batch Adam steps.
    gen = torch.Generator().manual_seed(0)
    centres = 2.0 * torch.randn(3, 8, generator=gen)
    y_train, y_test = torch.arange(300) % 3, torch.arange(150) % 3
    x_train = centres[y_train] + torch.randn(300, 8, generator=gen)
    x_test = centres[y_test] + torch.randn(150, 8, generator=gen)
    torch.manual_seed(0)
    embed, head = torch.nn.Linear(8, 4), create_head(kind, 4, 3)
    data = (x_train, y_train, x_test, y_test)
    assert _nearest_centre_accuracy(embed, *data) < 0.9  # the random projection alone does not pass
    opt = torch.optim.Adam([*embed.parameters(), *head.parameters()], lr=0.05)
    for _ in range(100):
        opt.zero_grad()
        F.cross_entropy(head(embed(x_train), y_train), y_train).backward()
        opt.step()
    assert _nearest_centre_accuracy(embed, *data) >= 0.95
