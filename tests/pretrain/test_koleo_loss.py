"""KoLeo on point sets whose nearest-neighbour distances are known in closed form."""

from __future__ import annotations

import math

import pytest
import torch

from lvdkit.pretrain.koleo_loss import koleo_loss, nearest_neighbours


def on_circle(degrees: list[float], radius: float = 1.0) -> torch.Tensor:
    angles = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return (radius * torch.stack([angles.cos(), angles.sin()], dim=1)).float()


def test_square_corners() -> None:
    # Neighbouring corners of a square inscribed in the unit circle are sqrt(2) apart.
    square = on_circle([45, 135, 225, 315])
    assert koleo_loss(square).item() == pytest.approx(-math.log(math.sqrt(2)), abs=1e-6)
    # Rows are L2-normalised first: scale does not matter.
    assert koleo_loss(square * 7.5).item() == pytest.approx(-math.log(math.sqrt(2)), abs=1e-6)


def test_hexagon_and_uneven_points() -> None:
    # Regular hexagon on the unit circle: neighbours 1 apart, -log 1 = 0.
    assert koleo_loss(on_circle([0, 60, 120, 180, 240, 300])).item() == pytest.approx(0.0, abs=1e-6)
    # 0 and 10 degrees are each other's neighbours (chord 2 sin 5 deg); 180's nearest is 10 (chord 2 sin 85 deg).
    points = on_circle([0, 10, 180])
    torch.testing.assert_close(nearest_neighbours(points), torch.tensor([1, 0, 1]))
    chord = [2 * math.sin(math.radians(5)), 2 * math.sin(math.radians(5)), 2 * math.sin(math.radians(85))]
    expected = -sum(math.log(c) for c in chord) / 3
    assert koleo_loss(points).item() == pytest.approx(expected, rel=1e-5)


def test_in_higher_dimension_orthonormal_points() -> None:
    # Orthonormal vectors are all sqrt(2) apart, whatever the dimension.
    assert koleo_loss(torch.eye(5)).item() == pytest.approx(-math.log(math.sqrt(2)), abs=1e-6)
    # Two antipodal points: each is the other's only neighbour, 2 apart (the diagonal must not win the argmax).
    assert koleo_loss(torch.tensor([[1.0, 0.0], [-1.0, 0.0]])).item() == pytest.approx(-math.log(2), abs=1e-6)


def test_gradient_spreads_points_and_duplicates_stay_finite() -> None:
    x = on_circle([0, 10, 20, 200]).requires_grad_()
    loss = koleo_loss(x)
    loss.backward()
    assert x.grad is not None
    with torch.no_grad():
        stepped = x - 0.05 * x.grad
    assert koleo_loss(stepped) < loss  # a gradient step spreads the clustered points

    duplicates = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    loss = koleo_loss(duplicates)
    loss.backward()
    assert torch.isfinite(loss) and loss > 10  # -log(tiny distance) is large but finite
    assert duplicates.grad is not None and torch.isfinite(duplicates.grad).all()


def test_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        koleo_loss(torch.ones(1, 3))
    with pytest.raises(ValueError, match=r"\(B, D\)"):
        koleo_loss(torch.ones(2, 3, 4))
