"""i-BAU (defense/ibau.py): the universal perturbation (bound, effect), the implicit hypergradient against explicit
matrix computations, the patched share of a batch, the unlearning step, options."""
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import load_script
from utils.defense_setup import parse_defense_args
from utils.errors import UserError

ibau = load_script("defense/ibau.py")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread beats two that wait for each other on a busy CPU (10x here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 3)).eval()


def _batches(count=3, size=8):
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(size, 3, 6, 6, generator=generator), torch.randint(0, 3, (size,), generator=generator))
            for _ in range(count)]


def _args(**overrides):
    values = dict(pert_lr=10.0, pert_reg=0.001, pert_norm_bound=1.0, amp=False, K=5, fixed_point_lr=0.1,
                  outer_portion=1.0)
    return types.SimpleNamespace(**{**values, **overrides})


def test_projection_scales_only_what_is_outside_the_ball():
    inside = torch.tensor([0.3, 0.4])
    assert torch.equal(ibau.project_l2(inside, 1.0), inside)
    outside = torch.tensor([3.0, 4.0])
    assert torch.allclose(ibau.project_l2(outside, 1.0), torch.tensor([0.6, 0.8]))
    assert torch.equal(ibau.project_l2(outside, 0), outside)  # 0: unbounded


def test_universal_perturbation_stays_in_its_ball_and_raises_the_clean_loss():
    model, batches = _tiny_model(), _batches()
    delta, raw_norm = ibau.universal_perturbation(model, batches, _args(pert_norm_bound=0.2))
    assert delta.shape == (1, 3, 6, 6)
    assert raw_norm > 0.2  # the bound was active ...
    assert float(delta.norm()) == pytest.approx(0.2, rel=1e-5)  # ... and is kept
    with torch.no_grad():
        for x, _ in batches:
            own = model(x).argmax(1)
            assert F.cross_entropy(model(x + delta), own) > F.cross_entropy(model(x), own)


def test_an_unbounded_perturbation_keeps_its_length():
    delta, raw_norm = ibau.universal_perturbation(_tiny_model(), _batches(), _args(pert_norm_bound=0))
    assert raw_norm > 0.2 and float(delta.norm()) == pytest.approx(raw_norm)


def _quadratic_problem(seed=0, n=4):
    """inner(delta) = 0.5 delta^T A delta - w^T delta (minimiser A^-1 w); outer = 0.5 ||delta - c||^2 + 0.5 ||w||^2;
    A symmetric with eigenvalues in [1, 5]."""
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    A = q @ torch.diag(torch.linspace(1.0, 5.0, n, dtype=torch.float64)) @ q.T
    w = torch.randn(n, generator=generator, dtype=torch.float64, requires_grad=True)
    c = torch.randn(n, generator=generator, dtype=torch.float64)
    unused = torch.zeros(2, dtype=torch.float64, requires_grad=True)

    def inner(delta):
        return 0.5 * delta @ A @ delta - w @ delta

    def outer(delta):
        return 0.5 * (delta - c).pow(2).sum() + 0.5 * w.pow(2).sum()
    return A, w, c, unused, inner, outer


def test_hypergradient_converges_to_the_implicit_function_theorem():
    A, w, c, unused, inner, outer = _quadratic_problem()
    solution = torch.linalg.solve(A, w.detach())
    # d/dw outer(delta*(w), w) = w + (d delta*/d w)^T (delta* - c), with d delta*/d w = A^-1
    exact = w.detach() + torch.linalg.solve(A, solution - c)
    grads = ibau.hypergradient(outer, inner, solution, [w, unused], K=200, fixed_point_lr=0.1)
    assert torch.allclose(grads[0], exact, atol=1e-8)
    assert torch.equal(grads[1], torch.zeros(2, dtype=torch.float64))  # a parameter neither loss uses


@pytest.mark.parametrize("K", [1, 2, 5])
def test_hypergradient_after_K_steps_is_the_K_term_neumann_series(K):
    A, w, c, unused, inner, outer = _quadratic_problem(seed=K)
    delta = torch.randn(4, dtype=torch.float64)  # any point, not only the fixed point
    a = 0.1
    jacobian = torch.eye(4, dtype=torch.float64) - a * A  # d phi / d delta of phi = delta - a (A delta - w)
    g = delta - c
    v = sum(torch.linalg.matrix_power(jacobian, k) @ g for k in range(K))
    expected = w.detach() + a * v  # d phi / d w = a I
    grads = ibau.hypergradient(outer, inner, delta, [w, unused], K=K, fixed_point_lr=a)
    assert torch.allclose(grads[0], expected, atol=1e-12)
    assert not torch.allclose(grads[0], w.detach() + torch.linalg.solve(A, g), atol=1e-3)  # K is truly cut short


def test_patch_mask_marks_the_configured_share():
    generator = torch.Generator().manual_seed(0)
    assert int(ibau.patch_mask(256, 0.01, generator, "cpu").sum()) == 2  # int(256 * 0.01), the authors' share
    assert int(ibau.patch_mask(100, 0.01, generator, "cpu").sum()) == 1
    assert int(ibau.patch_mask(10, 1.0, generator, "cpu").sum()) == 10
    assert ibau.patch_mask(10, 0.5, generator, "cpu").shape == (10, 1, 1, 1)


def test_unlearning_makes_the_model_resist_the_perturbation():
    model, batches = _tiny_model(), _batches()
    args = _args(pert_norm_bound=2.0)
    delta, _ = ibau.universal_perturbation(model, batches, args)

    def perturbed_loss():
        with torch.no_grad():
            return sum(float(F.cross_entropy(model(x + delta), y)) for x, y in batches)
    before = perturbed_loss()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(2):
        stats = ibau.unlearn(model, optimizer, batches, delta, args, torch.Generator().manual_seed(0))
    assert stats.batches == 3 and stats.samples == 24
    assert perturbed_loss() < before
    assert not model.training  # BatchNorm stays on running statistics


def test_defaults_are_backdoorbench_values_from_the_yaml():
    args = parse_defense_args(ibau.build_parser(), ["--result_file", "x", "--yaml_path",
                                                       "config/defense/ibau/cifar10.yaml"], "ibau")
    assert (args.ratio, args.batch_size, args.n_rounds, args.K, args.lr, args.pert_lr, args.pert_reg,
            args.fixed_point_lr, args.outer_portion) == (0.05, 256, 5, 5, 1e-4, 10.0, 0.001, 0.1, 0.01)


@pytest.mark.parametrize("option,value", [("--K", "0"), ("--n_rounds", "-1"), ("--lr", "0"),
                                          ("--pert_norm_bound", "-1"), ("--outer_portion", "1.5")])
def test_bad_options_are_clear_errors(option, value):
    with pytest.raises(UserError, match=option):
        ibau.main(["--result_file", "nowhere", option, value])
