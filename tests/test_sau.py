"""SAU (defense/sau.py): shared adversarial examples within the L-inf bound in pixel space, the PGD start, the JS
divergence, the shared adversarial loss and the configured weights of the unlearning objective, BatchNorm mode,
options."""
import math
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import load_script
from utils.defense_setup import parse_defense_args
from utils.errors import UserError
from utils.tensor_data import DeviceImages

sau = load_script("defense/sau.py")
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)  # CIFAR-10's: the bound must hold in pixel space


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread beats two that wait for each other on a busy CPU (10x here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny_model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 3)).eval()


def _data(count=16):
    generator = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (count, 6, 6, 3), dtype=torch.uint8, generator=generator)
    return DeviceImages(images.numpy(), (torch.arange(count) % 3).numpy(), "cpu", MEAN, STD)


def _args(**overrides):
    values = dict(trigger_norm=0.2, adv_lr=0.2, adv_steps=5, pgd_init="max", beta_1=0.01, beta_2=1.0, amp=False,
                  lmd_1=1.0, lmd_2=0.0, lmd_3=1.0)
    return types.SimpleNamespace(**{**values, **overrides})


def _attack(args, model_seed=0, reference_seed=1):
    data = _data()
    x, y = next(data.batches(len(data)))
    model, reference = _tiny_model(model_seed), _tiny_model(reference_seed)
    clean_ref = reference(x).argmax(1)
    delta = sau.shared_adversarial_perturbation(model, reference, x, y, clean_ref, data.std, args,
                                                torch.Generator().manual_seed(0))
    return data, x, delta


@pytest.mark.parametrize("init", sau.PGD_INITS)
def test_shared_adversarial_examples_stay_within_the_bound_in_pixel_space(init):
    data, x, delta = _attack(_args(pgd_init=init, adv_lr=0.15))
    shift = (data.pixels(x + delta / data.std) - data.pixels(x)) / 255.0  # what the attack did to the [0, 1] image
    assert float(shift.abs().max()) <= 0.2 + 1e-5
    assert float(shift.abs().max()) > 0.1  # it did move
    assert torch.allclose(shift, delta, atol=1e-5)


def test_without_steps_the_perturbation_is_the_start():
    _, _, delta = _attack(_args(adv_steps=0, pgd_init="max"))
    assert torch.all(delta == 0.2)
    _, _, delta = _attack(_args(adv_steps=0, pgd_init="random"))
    assert float(delta.abs().max()) <= 0.2 and float(delta.min()) < 0 < float(delta.max())


def test_pgd_moves_against_the_configured_loss():
    """One step of a zero-start PGD whose loss is only the shared (JS) term lowers that term."""
    data = _data()
    x, y = next(data.batches(len(data)))
    model, reference = _tiny_model(0), _tiny_model(1)
    clean_ref = reference(x).argmax(1)
    args = _args(pgd_init="zero", adv_steps=1, adv_lr=0.05, beta_1=0.0)
    delta = sau.shared_adversarial_perturbation(model, reference, x, y, clean_ref, data.std, args, None)
    with torch.no_grad():
        before = sau.js_divergence(model(x), reference(x)).sum()
        after = sau.js_divergence(model(x + delta / data.std), reference(x + delta / data.std)).sum()
    assert after < before


def test_js_divergence_by_hand():
    logits = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    assert torch.allclose(sau.js_divergence(logits, logits), torch.zeros(2), atol=1e-7)
    p, q = torch.tensor([0.5, 0.5]), torch.tensor([0.9, 0.1])
    m = (p + q) / 2
    expected = 0.5 * (p * (p / m).log()).sum() + 0.5 * (q * (q / m).log()).sum()
    other = torch.tensor([[math.log(9.0), 0.0]])
    assert float(sau.js_divergence(logits[:1], other)) == pytest.approx(float(expected), rel=1e-5)
    assert float(sau.js_divergence(other, logits[:1])) == pytest.approx(float(expected), rel=1e-5)  # symmetric
    extreme = sau.js_divergence(torch.tensor([[30.0, -30.0]]), torch.tensor([[-30.0, 30.0]]))
    assert float(extreme) <= math.log(2) + 1e-6


def test_shared_adversarial_loss_is_minus_log_one_minus_p_over_the_masked_examples():
    adv_logits = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.3, 0.3, 0.4], [0.1, 0.1, 0.8]]))
    label_ref = torch.tensor([0, 2, 1])
    mask = torch.tensor([True, False, True])
    loss = sau.shared_adversarial_loss(adv_logits, label_ref, mask)
    expected = (-math.log(1 - 0.7) - math.log(1 - 0.1)) / 3  # only the masked ones, divided by the batch size
    assert float(loss) == pytest.approx(expected, rel=1e-4)
    assert float(sau.shared_adversarial_loss(adv_logits, label_ref, torch.zeros(3, dtype=torch.bool))) == 0.0
    clamped = sau.shared_adversarial_loss(torch.tensor([[20.0, 0.0, 0.0]]), torch.tensor([0]), torch.tensor([True]))
    assert math.isfinite(float(clamped))  # p -> 1 is clamped, not log(0)


def _losses(args, train_mode=False):
    data = _data()
    x, y = next(data.batches(len(data)))
    model, reference = _tiny_model(0), _tiny_model(1)
    clean_ref = reference(x).argmax(1)
    delta = sau.shared_adversarial_perturbation(model, reference, x, y, clean_ref, data.std, args, None)
    terms, logits, fooled = sau.unlearning_losses(model, reference, x, y, delta, clean_ref, data.std, train_mode)
    return model, reference, x, y, delta, clean_ref, data.std, terms, logits, fooled


def test_unlearning_terms_are_the_configured_ones():
    # a large budget, so that the tiny reference is fooled on some examples
    model, reference, x, y, delta, clean_ref, std, terms, logits, fooled = _losses(_args(trigger_norm=3.0, adv_lr=1.0))
    adversarial = x + delta / std
    with torch.no_grad():
        assert torch.allclose(logits, model(x), atol=1e-5)
        assert terms["clean"].item() == pytest.approx(float(F.cross_entropy(model(x), y)), rel=1e-5)
        assert terms["adversarial"].item() == pytest.approx(float(F.cross_entropy(model(adversarial), y)), rel=1e-5)
        label_ref = reference(adversarial).argmax(1)
        mask = (label_ref != y) & (label_ref != clean_ref)
        p = F.softmax(model(adversarial), dim=1).gather(1, label_ref[:, None]).squeeze(1)
        by_hand = -torch.log(1 - p.clamp(max=0.999))[mask].sum() / len(y)
    assert mask.any() and not mask.all() and fooled == pytest.approx(float(mask.float().mean()))
    assert terms["shared"].item() == pytest.approx(float(by_hand), rel=1e-3)
    for weights in [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (1.0, 0.5, 2.0)]:
        args = _args(lmd_1=weights[0], lmd_2=weights[1], lmd_3=weights[2])
        expected = sum(w * terms[name].item() for w, name in zip(weights, ("clean", "adversarial", "shared")))
        assert sau.unlearning_objective(terms, args).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("train_mode", [False, True])
def test_batchnorm_statistics_move_only_in_train_mode(train_mode):
    model, *_ = _losses(_args(adv_steps=1), train_mode=train_mode)
    assert torch.equal(model[1].running_mean, torch.zeros(4)) != train_mode  # a fresh BatchNorm's statistics
    assert not model.training  # back on running statistics for the next attack


def test_defaults_from_the_yaml():
    args = parse_defense_args(sau.build_parser(), ["--result_file", "x", "--yaml_path",
                                                      "config/defense/sau/cifar10.yaml"], "sau")
    assert (args.ratio, args.batch_size, args.lr, args.trigger_norm, args.adv_lr, args.adv_steps, args.pgd_init,
            args.beta_1, args.beta_2, args.lmd_1, args.lmd_2, args.lmd_3, args.train_mode) == \
        (0.05, 256, 1e-4, 0.2, 0.2, 5, "max", 0.01, 1.0, 1.0, 0.0, 1.0, False)
    assert 0 < args.n_rounds <= 100


@pytest.mark.parametrize("option,value", [("--n_rounds", "-1"), ("--lr", "0"), ("--trigger_norm", "-0.1"),
                                          ("--lmd_3", "-1"), ("--adv_steps", "-2")])
def test_bad_options_are_clear_errors(option, value):
    with pytest.raises(UserError, match=option):
        sau.main(["--result_file", "nowhere", option, value])
