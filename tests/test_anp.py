"""ANP (defense/anp.py): options, the adversarial neuron perturbation (one sign step, bounded by eps), mask
optimisation touching only the masks, and end to end on the shared record with the labelled test-data sweep."""
import json

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from conftest import SHARED_RECORDS
from helpers import EVAL_LIMIT, load_script, run_defense_on_shared_record
from fakes import Tiny, fake_run, small_data, tiny
from utils.defense_setup import defense_defaults, parse_defense_args
from utils.errors import UserError
from utils.models import build_model, load_weights
from utils.pruning import BatchNormMasks
from utils.records import load_attack_record

anp = load_script("defense/anp.py")
DEFAULTS = defense_defaults(anp.build_parser(), "anp")  # what a run starts from: the YAML


def test_defaults_are_the_reference_values_from_the_yaml():
    args = parse_defense_args(anp.build_parser(), ["--result_file", "x", "--yaml_path",
                                                      "config/defense/anp/cifar10.yaml"], "anp")
    assert (args.ratio, args.batch_size, args.nb_iter, args.print_every, args.lr, args.anp_eps, args.anp_steps,
            args.anp_alpha, args.noise_clip) == (0.01, 128, 2000, 500, 0.2, 0.4, 1, 0.2, True)
    assert (args.pruning_by, args.pruning_number, args.acc_tolerance, args.sweep) == ("threshold", 0.2, None, False)


@pytest.mark.parametrize("extra, message", [
    (["--nb_iter", "0"], "--nb_iter"),
    (["--anp_eps", "-0.1"], "--anp_eps"),
    (["--anp_alpha", "1.5"], "--anp_alpha"),
    (["--pruning_number", "2"], "threshold in \\[0, 1\\]"),
])
def test_bad_options_are_clear_errors(extra, message):
    with pytest.raises(UserError, match=message):
        anp.main(["--result_file", "nowhere", *extra])


def options(**changes):
    return dict({"nb_iter": 6, "print_every": 4}, **changes)


def small_setup():
    model = tiny().train()
    return model, small_data()


@pytest.mark.parametrize("clip", [True, False])
def test_perturbation_is_one_sign_step_from_a_uniform_start_and_bounded_by_eps(clip):
    model, data = small_setup()
    args = fake_run(DEFAULTS, **options(anp_eps=0.4, anp_steps=1, noise_clip=clip)).args
    x, y = data.normalise(data.images[:8]), data.labels[:8]
    with BatchNormMasks(model, "ANP", noise=True) as masks:
        anp.perturb(model, masks, x, y, args, torch.Generator().manual_seed(3))
        after = [noise.detach().clone() for noise in masks.noise_parameters()]
        # the same start, drawn again from the same seed, and the loss gradient there
        generator = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for noise in masks.noise_parameters():
                noise.copy_((torch.rand(noise.shape, generator=generator) * 2 - 1) * 0.4)
        start = [noise.detach().clone() for noise in masks.noise_parameters()]
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), masks.noise_parameters())
    assert any(bool((grad != 0).any()) for grad in grads)
    for begin, end, grad in zip(start, after, grads):
        assert begin.abs().max() <= 0.4
        stepped = begin + 0.4 * grad.sign()  # ascent on the loss
        assert torch.allclose(end, stepped.clamp(-0.4, 0.4) if clip else stepped, atol=1e-6)
        if clip:
            assert end.abs().max() <= 0.4 + 1e-7
    if not clip:  # the reference code's unprojected step can leave the eps box
        assert max(float(end.abs().max()) for end in after) > 0.4


def test_perturbed_forward_scales_gamma_by_mask_plus_noise_and_beta_by_one_plus_noise():
    model, data = small_setup()
    model.eval()
    x = data.normalise(data.images[:4])
    with BatchNormMasks(model, "ANP", noise=True) as masks:
        with torch.no_grad():
            masks.masks["bn"].fill_(0.5)
            masks.weight_noise["bn"].fill_(0.25)
            masks.bias_noise["bn"].fill_(-0.5)
        masks.perturbed = True
        perturbed = model(x)
        masks.perturbed = False
        natural = model(x)
    reference = Tiny().eval()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        reference.bn.weight.mul_(0.75)
        reference.bn.bias.mul_(0.5)
    assert torch.allclose(perturbed, reference(x), atol=1e-5)
    with torch.no_grad():
        reference.load_state_dict(model.state_dict())
        reference.bn.weight.mul_(0.5)
    assert torch.allclose(natural, reference(x), atol=1e-5)


@pytest.mark.parametrize("eps, passes", [(0.4, 3), (0.0, 1)])
def test_mask_optimisation_changes_only_the_masks(eps, passes):
    model, data = small_setup()
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    run = fake_run(DEFAULTS, **options(anp_eps=eps, lr=1.0))
    with BatchNormMasks(model, "ANP", noise=True) as masks:
        rows = anp.optimise_masks(run, model, masks, data)
        values = masks.values()["bn"]
        noise = masks.noise_parameters()
        assert all(bool((n == 0).all()) == (eps == 0) for n in noise)  # no perturbation without a budget
    assert [row["batch"] for row in rows] == [4, 2]  # rows per print_every iterations, the rest in a last row
    assert run.counted["mask"] == 6 * 8 * passes  # forward passes: perturbation step, perturbed, natural
    assert all(torch.equal(weights[name], p) for name, p in model.named_parameters())
    assert not torch.equal(values, torch.ones(4)) and float(values.min()) >= 0 and float(values.max()) <= 1


# ---------------------------------------------------------------- end to end on the shared BackdoorBench record

@pytest.fixture(scope="module")
def anp_run(tmp_path_factory):
    return run_defense_on_shared_record(
        tmp_path_factory.mktemp("anp"), "defense/anp.py", "config/defense/anp/cifar10.yaml",
        "--nb_iter", 4, "--print_every", 2, "--batch_size", 32, "--pruning_by", "number", "--pruning_number", 7,
        "--sweep", "true", "--pruning_max", 5, "--pruning_step", 5)


def test_anp_end_to_end_prunes_the_lowest_masks_and_keeps_the_sweep_apart(anp_run):
    folder, result = anp_run
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "ANP: ACC" in result.stdout and "TEST" in result.stdout
    summary = json.loads((folder / "summary.json").read_text())
    decision = summary["pruning"]
    assert summary["defense"] == "anp" and summary["mask_iterations"] == 4 and summary["mask_samples"] == 500
    assert decision == {**decision, "rule": "fixed", "pruning_by": "number", "pruning_amount": 7,
                        "pruned_channels": 7, "total_channels": 3392}
    assert summary["images"]["mask"] == 4 * 32 * 3
    assert summary["images"]["sweep"] == 2 * 2 * EVAL_LIMIT and summary["seconds"]["sweep"] > 0
    assert len(pd.read_csv(folder / "mask_df.csv")) == 2

    sweep = pd.read_csv(folder / "pruning_sweep.csv")  # the analysis: test metrics per amount
    assert sweep["amount"].tolist() == [0, 5] and sweep["pruned"].tolist() == [0, 5]
    assert sweep[["test_acc", "test_asr", "test_ra"]].notna().all().all()
    assert sweep["test_acc"].iloc[0] == pytest.approx(summary["before"]["test_acc"])

    masks = pd.read_csv(folder / "mask_values.csv")
    lowest = masks.sort_values("mask", kind="stable").head(7)  # the saved model follows the masks, not the sweep
    assert set(zip(lowest["layer"], lowest["channel"])) == set(
        zip(masks[masks["pruned"]]["layer"], masks[masks["pruned"]]["channel"]))
    saved = load_weights(build_model("preactresnet18", 10), torch.load(folder / "defense_result.pt",
                                                                       weights_only=True)["model"]).state_dict()
    original = load_attack_record("badnet_0_1", SHARED_RECORDS).state_dict
    changed = {key for key, value in saved.items() if not torch.equal(value, original[key].to(value.dtype))}
    assert changed == {f"{layer}.weight" for layer in lowest["layer"]}
    for row in lowest.itertuples():
        assert saved[f"{row.layer}.weight"][row.channel] == 0
