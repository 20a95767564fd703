import pytest
import torch

from fastunlearn.objectives import forget_loss, npo, retain_nll, simnpo


def test_npo_value_and_gradient():
    g = torch.Generator().manual_seed(0)
    nll = (torch.rand(7, generator=g, dtype=torch.float64) * 5).requires_grad_()
    ref = torch.rand(7, generator=g, dtype=torch.float64) * 5
    beta = 0.7
    loss = npo(nll, ref, beta)
    expected = -(2 / beta) * torch.log(torch.sigmoid(beta * (nll - ref))).mean()
    torch.testing.assert_close(loss, expected)
    (grad,) = torch.autograd.grad(loss, nll)
    # DESIGN §4: dL/dNLL_i = -2 sigmoid(-beta (NLL_i - ref_i)) / n
    torch.testing.assert_close(grad, -2 * torch.sigmoid(-beta * (nll - ref)).detach() / len(nll))
    assert (grad < 0).all()  # minimising NPO raises the forget NLL


def test_npo_fades_once_forgotten():
    ref = torch.zeros(1)
    near = torch.tensor([0.0], requires_grad=True)
    far = torch.tensor([50.0], requires_grad=True)
    g_near, = torch.autograd.grad(npo(near, ref, 1.0), near)
    g_far, = torch.autograd.grad(npo(far, ref, 1.0), far)
    assert abs(g_far.item()) < 1e-12 < abs(g_near.item())


def test_simnpo_is_length_normalised():
    nll = torch.tensor([2.0, 8.0], dtype=torch.float64)
    lengths = torch.tensor([1.0, 4.0], dtype=torch.float64)
    loss = simnpo(nll, lengths, beta=2.0, gamma=0.5)
    expected = -(2 / 2.0) * torch.nn.functional.logsigmoid(2.0 * torch.tensor(2.0, dtype=torch.float64) - 0.5)
    torch.testing.assert_close(loss, expected)


def test_ga_retain_and_dispatch():
    nll = torch.tensor([1.0, 3.0])
    lengths = torch.tensor([1.0, 3.0])
    assert forget_loss("ga", nll, None, lengths, 1.0).item() == pytest.approx(-2.0)
    assert forget_loss("graddiff", nll, None, lengths, 1.0).item() == pytest.approx(-2.0)
    assert retain_nll(nll, lengths).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown method"):
        forget_loss("nope", nll, nll, lengths, 1.0)
