"""FST (defense/fst.py): head re-initialisation at the original norm, norm projection, shift penalty, registry
coverage, options, and end to end on the shared record."""
import json
import logging
import types

import pandas as pd
import pytest
import torch
import torch.nn as nn

from helpers import EVAL_LIMIT, build_for_shapes, load_script, run_defense_on_shared_record
from utils.defense_run import DefenseRun
from utils.defense_setup import parse_defense_args
from utils.errors import UserError
from utils.models import MODELS, build_model, classifier_head, load_weights
from utils.tensor_data import Augmentation, DeviceImages

fst = load_script("defense/fst.py")


def _tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 3))


def test_reinitialised_head_has_exactly_the_original_norm_and_new_weights():
    head = _tiny_model()[5]
    weight, bias = head.weight.detach().clone(), head.bias.detach().clone()
    original = fst.reinitialise_head(head)
    assert torch.equal(original, weight)
    assert float(head.weight.detach().norm()) == pytest.approx(float(weight.norm()), rel=1e-6)
    assert not torch.allclose(head.weight, weight) and not torch.allclose(head.bias, bias)
    assert float(head.bias.detach().abs().max()) <= 1 / 2  # U(-1/sqrt(4), 1/sqrt(4))


def test_bias_is_kept_when_asked():
    head = _tiny_model()[5]
    bias = head.bias.detach().clone()
    fst.reinitialise_head(head, reinit_bias=False)
    assert torch.equal(head.bias, bias)


def test_penalty_is_alpha_times_the_inner_product_by_hand():
    weight = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    original = torch.tensor([[0.5, -1.0], [2.0, 0.0]])
    penalty = fst.shift_penalty(weight, original, 0.2)
    assert penalty.item() == pytest.approx(0.2 * (0.5 - 2.0 + 6.0 + 0.0))
    penalty.backward()
    assert torch.allclose(weight.grad, 0.2 * original)  # the gradient pushes the head against the original


def test_projection_restores_a_given_norm():
    weight = torch.tensor([[3.0, 4.0]])
    fst.project_norm(weight, torch.tensor(10.0))
    assert torch.allclose(weight, torch.tensor([[6.0, 8.0]]))


def _fake_run(model, alpha, epochs=3, lr=0.5):
    torch.manual_seed(1)
    images = torch.randint(0, 256, (24, 8, 8, 3), dtype=torch.uint8)
    data = DeviceImages(images.numpy(), (torch.arange(24) % 3).numpy(), "cpu", (0.5,) * 3, (0.25,) * 3)
    args = types.SimpleNamespace(lr=lr, sgd_momentum=0.9, wd=0.0, epochs=epochs, amp=False, batch_size=8,
                                 alpha=alpha, progress=False)
    setup = types.SimpleNamespace(device=torch.device("cpu"), clean_subset=data, augmentation=Augmentation(1, True))
    counted = []
    run = types.SimpleNamespace(setup=setup, args=args, generator=torch.Generator().manual_seed(0),
                                count_images=lambda phase, n: counted.append(n), counted=counted,
                                epoch_row=lambda epoch, stats, m, force_eval=False: {"epoch": epoch,
                                                                                     "train_acc": stats.acc},
                                logger=logging.getLogger("test_fst"))
    run.end_epoch = types.MethodType(DefenseRun.end_epoch, run)  # the frame's own bookkeeping over these stand-ins
    return run


def test_tuning_projects_the_head_norm_back_after_every_step(monkeypatch):
    model = _tiny_model()
    head = model[5]
    original = fst.reinitialise_head(head)
    norm = float(original.norm())
    steps, project = [], fst.project_norm

    def watched(weight, target):
        drifted = float(weight.detach().norm())
        project(weight, target)
        steps.append((drifted, float(weight.detach().norm())))
    monkeypatch.setattr(fst, "project_norm", watched)
    run = _fake_run(model, alpha=5.0)
    rows = fst.tune(run, model, head, original)
    assert len(rows) == 3 and run.counted == [24, 24, 24]
    assert len(steps) == 3 * 3  # 24 images in batches of 8, 3 epochs
    assert any(abs(drifted - norm) > 1e-4 for drifted, _ in steps)  # the steps did change the norm
    assert all(projected == pytest.approx(norm, rel=1e-5) for _, projected in steps)


def test_the_penalty_turns_the_head_away_from_the_original():
    model = _tiny_model()
    head = model[5]
    original = fst.reinitialise_head(head)
    start = fst.cosine(head.weight, original)
    fst.tune(_fake_run(model, alpha=5.0), model, head, original)
    assert fst.cosine(head.weight, original) < start - 0.1
    unpenalised = _tiny_model()
    original = fst.reinitialise_head(unpenalised[5])
    fst.tune(_fake_run(unpenalised, alpha=0.0), unpenalised, unpenalised[5], original)
    assert fst.cosine(unpenalised[5].weight, original) > fst.cosine(head.weight, original)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_registered_model_gets_its_head_reinitialised_at_its_norm(name):
    model = build_for_shapes(name)
    _, head = classifier_head(model, 10)
    head.to_empty(device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        head.weight.normal_()
    norm = float(head.weight.detach().norm())
    original = fst.reinitialise_head(head)
    assert float(original.norm()) == pytest.approx(norm)
    assert float(head.weight.detach().norm()) == pytest.approx(norm, rel=1e-5)


def test_defaults_are_the_authors_from_the_yaml():
    args = parse_defense_args(fst.build_parser(), ["--result_file", "x", "--yaml_path",
                                                      "config/defense/fst/cifar10.yaml"], "fst")
    assert (args.ratio, args.batch_size, args.epochs, args.lr, args.sgd_momentum, args.wd, args.alpha,
            args.reinit_bias) == (0.05, 128, 10, 0.01, 0.9, 0.0, 0.2, True)


@pytest.mark.parametrize("option,value", [("--alpha", "-0.1"), ("--epochs", "-1"), ("--lr", "0")])
def test_bad_options_are_clear_errors(option, value):
    with pytest.raises(UserError, match=option):
        fst.main(["--result_file", "nowhere", option, value])


def test_unknown_head_name_is_a_user_error():
    with pytest.raises(UserError, match="no Linear layer named"):
        classifier_head(_tiny_model(), 3, "fc")


@pytest.fixture(scope="module")
def fst_run(tmp_path_factory):
    return run_defense_on_shared_record(tmp_path_factory.mktemp("fst"), "defense/fst.py",
                                        "config/defense/fst/cifar10.yaml", "--epochs", 1, "--ratio", 0.01)


def test_fst_end_to_end_keeps_the_head_norm_and_reports(fst_run):
    folder, result = fst_run
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["defense"] == "fst" and summary["head"] == "linear" and summary["clean_samples"] == 500
    assert summary["images"]["finetune"] == 500 and summary["images"]["evaluate_after"] == 2 * EVAL_LIMIT
    table = pd.read_csv(folder / "fst_df.csv", index_col=0)
    assert len(table) == 1 and table["test_acc"].iloc[-1] == pytest.approx(summary["after"]["test_acc"])
    assert "FST: ACC" in result.stdout + result.stderr
    saved = torch.load(folder / "defense_result.pt", weights_only=True)
    model = load_weights(build_model("preactresnet18", 10), saved["model"])
    from conftest import SHARED_RECORDS
    from utils.records import load_attack_record
    original = load_attack_record("badnet_0_1", SHARED_RECORDS).state_dict
    head, head_before = model.linear.weight.detach(), original["linear.weight"].float()
    assert float(head.norm()) == pytest.approx(float(head_before.norm()), rel=1e-4)
    assert summary["head_weight_norm"] == pytest.approx(float(head_before.norm()), rel=1e-6)
    assert abs(float(nn.functional.cosine_similarity(head.flatten(), head_before.flatten(), dim=0))) < 0.5
    assert not torch.equal(model.layer1[0].conv1.weight, original["layer1.0.conv1.weight"])  # whole model tuned
