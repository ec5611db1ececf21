"""A user's own model, data and trigger, end to end (sh/make_record.py -> defenses): tiny models made here (one that
calls x.view and has no BatchNorm, one with a softmax at the output), a tiny image folder, a registered trigger."""
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import load_script
from own_model_pieces import CLASSES, write_own_model_pieces
from utils.catalog import DEFENSES
from utils.errors import UserError
from utils.model_requirements import MODEL_REQUIREMENTS
from utils.records import load_attack_record
from utils.triggers import TRIGGERS
from utils.user_models import outputs_are_probabilities

make_record = load_script("sh/make_record.py")
ft = load_script("defense/ft.py")
ulrl = load_script("defense/ulrl.py")
clp = load_script("defense/clp.py")

@pytest.fixture(scope="module")
def pieces(tmp_path_factory):
    return write_own_model_pieces(tmp_path_factory.mktemp("own"))


def build(pieces, name, model, weights, *extra):
    argv = ["--name", name, "--record_dir", str(pieces / "record"), "--model", model, "--weights",
            str(pieces / weights), "--mean", "0.5", "--std", "0.25", "--clean_data", str(pieces / "images"),
            "--target", "0", *extra]
    assert make_record.main(argv) == 0
    return pieces / "record" / name


def defense_argv(pieces, name, model, *extra):
    return ["--result_file", name, "--record_dir", str(pieces / "record"), "--model", model, "--device", "cpu",
            "--ratio", "0.5", "--progress", "false", *extra]


@pytest.fixture(scope="module")
def view_record(pieces):
    spec = f"{pieces / 'tiny_nets.py'}:view_net"
    return build(pieces, "view", spec, "view.pth", "--trigger", "badnet"), spec


@pytest.fixture(scope="module")
def softmax_record(pieces):
    spec = f"{pieces / 'tiny_nets.py'}:SoftmaxNet"
    return build(pieces, "softmax", spec, "softmax.pth", "--trigger", "blended"), spec


def test_record_carries_model_normalisation_classes_and_the_triggered_test_set(view_record, pieces):
    folder, spec = view_record
    record = load_attack_record(folder)
    assert record.model_name == spec and record.clean_data == "imagefolder" and record.img_size == (16, 16, 3)
    assert record.extra["normalization"] == {"mean": [0.5] * 3, "std": [0.25] * 3}
    assert record.extra["class_names"] == list(CLASSES) and record.bd_train is None
    # bd_test: the 12 test images of classes 1 and 2 (ImageFolder order 6..17), all relabelled to the target 0
    assert record.bd_test.original_indices.tolist() == list(range(6, 18))
    assert set(record.bd_test.bd_labels.tolist()) == {0} and record.bd_test.original_labels.tolist() == [1] * 6 + [2] * 6
    clean = np.asarray(Image.open(pieces / "images" / "test" / "bee" / "img0.png"))
    expected = TRIGGERS["badnet"].apply(clean[None])[0]
    assert np.array_equal(record.bd_test.images((16, 16, 3))[0], expected)


def test_ft_defends_a_model_that_calls_view_and_has_no_batchnorm(view_record, pieces):
    folder, spec = view_record
    assert ft.main(defense_argv(pieces, "view", spec, "--epochs", "2")) == 0
    out = folder / "defense" / "ft"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == spec and summary["dataset"] == "imagefolder" and summary["clean_samples"] == 18
    assert summary["images"]["evaluate_before"] == 18 + 12  # the clean test folder and the triggered test set
    saved = torch.load(out / "defense_result.pt", weights_only=True)["model"]
    original = load_attack_record(folder).state_dict
    assert set(saved) == set(original) and not torch.equal(saved["fc.weight"], original["fc.weight"])
    log = next((out / "log").glob("*.log")).read_text()
    assert "channels_last only for registered models" in log and "probabilities" not in log


def test_softmax_outputs_are_run_as_log_probabilities_by_ulrl(softmax_record, pieces):
    folder, spec = softmax_record
    assert ulrl.main(defense_argv(pieces, "softmax", spec, "--unlearning_epochs", "2", "--relearn_epochs", "1")) == 0
    out = folder / "defense" / "ulrl"
    log = next((out / "log").glob("*.log")).read_text()
    assert "outputs probabilities (rows sum to 1)" in log
    summary = json.loads((out / "summary.json").read_text())
    # log-probabilities: the per-sample loss is -log p, finite and positive, never the near-constant CE of raw rows
    assert 0 < summary["before"]["clean_test_loss_avg_over_batch"] < 20
    assert all(0 <= summary["after"][key] <= 1 for key in ("test_acc", "test_asr", "test_ra"))


def test_batchnorm_defense_refuses_before_reading_data_or_evaluating(view_record, pieces, monkeypatch):
    folder, spec = view_record
    import utils.defense_run as frame
    import utils.defense_setup as setup

    def must_not_run(*_args, **_kwargs):
        raise AssertionError("reached evaluation or data reading")
    monkeypatch.setattr(frame, "evaluate", must_not_run)
    monkeypatch.setattr(setup, "CleanSplit", must_not_run)
    with pytest.raises(UserError, match="no BatchNorm2d: CLP does not apply"):
        clp.main(defense_argv(pieces, "view", spec))
    assert not (folder / "defense" / "clp").exists()


def test_a_record_never_imports_its_model_unless_the_user_names_it(view_record, pieces):
    folder, spec = view_record
    argv = defense_argv(pieces, "view", spec, "--epochs", "1")
    without_model = argv[:argv.index("--model")] + argv[argv.index("--model") + 2:]
    with pytest.raises(UserError, match="which runs code; to run it, pass --model"):
        ft.main(without_model)
    with pytest.raises(UserError, match="does not match the record's model"):
        ft.main(defense_argv(pieces, "view", f"{pieces / 'tiny_nets.py'}:SoftmaxNet", "--epochs", "1"))


def test_poisoned_folder_matched_by_name_and_the_target_class_left_out(pieces, capsys):
    poisoned = pieces / "poisoned"
    for name in CLASSES:
        (poisoned / name).mkdir(parents=True)
        for index in (1, 4):
            clean = np.asarray(Image.open(pieces / "images" / "test" / name / f"img{index}.png"))
            Image.fromarray(255 - clean).save(poisoned / name / f"img{index}.png")
    folder = build(pieces, "from_folder", f"{pieces / 'tiny_nets.py'}:view_net", "view.pth",
                   "--poisoned_folder", str(poisoned))
    record = load_attack_record(folder)
    assert record.bd_test.original_indices.tolist() == [7, 10, 13, 16] and set(record.bd_test.bd_labels) == {0}
    out = capsys.readouterr().out
    assert "left out 2 poisoned images of the target class 0" in out
    assert f"--result_file from_folder --record_dir {pieces / 'record'} --model {pieces / 'tiny_nets.py'}:view_net" in out
    inverted = 255 - np.asarray(Image.open(pieces / "images" / "test" / "bee" / "img1.png"))
    assert np.array_equal(record.bd_test.images((16, 16, 3))[0], inverted)


def test_whole_pickled_model_needs_explicit_trust(pieces, monkeypatch):
    argv = ["--name", "whole", "--record_dir", str(pieces / "record"), "--model_file", str(pieces / "whole_model.pt"),
            "--mean", "0.5", "--std", "0.25", "--clean_data", str(pieces / "images"), "--trigger", "badnet",
            "--target", "0"]
    with pytest.raises(UserError, match="--trust_model_file true"):
        make_record.main(argv)
    assert not (pieces / "record" / "whole").exists()
    monkeypatch.syspath_prepend(str(pieces))  # unpickling imports the model's class by its module name
    assert make_record.main(argv + ["--trust_model_file", "true"]) == 0
    assert load_attack_record(pieces / "record" / "whole").model_name == f"pickled:{pieces / 'whole_model.pt'}"


@pytest.mark.parametrize("change, message", [
    (("--mean", None), "input normalisation"),
    (("--target", "3"), "--target must be a label in"),
    (("--trigger", "nosuch"), "unknown trigger"),
    (("--weights", "softmax.pth"), None),  # the softmax net's weights fit view_net too: accepted
])
def test_bad_pieces_are_one_clear_error_and_write_nothing(pieces, change, message):
    option, value = change
    argv = {"--name": "bad", "--record_dir": str(pieces / "record"), "--model": f"{pieces / 'tiny_nets.py'}:view_net",
            "--weights": str(pieces / "view.pth"), "--mean": "0.5", "--std": "0.25",
            "--clean_data": str(pieces / "images"), "--trigger": "badnet", "--target": "0"}
    argv[option] = None if value is None else (str(pieces / value) if value.endswith(".pth") else value)
    flat = [item for key, val in argv.items() if val is not None for item in (key, val)]
    if message is None:
        flat[flat.index("bad")] = "nested_state_dict"
        assert make_record.main(flat) == 0
        return
    with pytest.raises(UserError, match=message):
        make_record.main(flat)
    assert not (pieces / "record" / "bad").exists()


def test_probability_rows_are_told_from_logits():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, 0.3]])
    assert outputs_are_probabilities(logits.softmax(1))
    assert not outputs_are_probabilities(logits)
    assert not outputs_are_probabilities(torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.6, -0.2]]))  # a negative entry


def test_every_defense_states_what_it_needs_of_a_model():
    assert set(MODEL_REQUIREMENTS) == set(DEFENSES)


REFUSE_VIEW_NET = {"clp": "BatchNorm2d", "anp": "BatchNorm", "rnp": "BatchNorm", "fp": "global pooling",
                   "nad": "needs 3 feature-map resolutions above 1x1 and this model .ViewNet. has 1"}


@pytest.mark.parametrize("defense", sorted(MODEL_REQUIREMENTS))
def test_requirements_refuse_only_what_a_defense_cannot_run(defense, pieces):
    from types import SimpleNamespace

    from utils.models import build_model
    from utils.user_models import build_user_model
    check = MODEL_REQUIREMENTS[defense]
    if check is None:
        return
    args = SimpleNamespace(pairing="traced", skip_layers=["shortcut"], scope="head", linear_name=None,
                           pool_name=None, layer_names=["auto"], betas=[500.0, 1000.0, 1000.0])
    check(build_model("airbench_cpu", 10), SimpleNamespace(img_size=(32, 32, 3), num_classes=10), args)
    view_net = build_user_model(f"{pieces / 'tiny_nets.py'}:view_net", 3, (16, 16, 3))
    record = SimpleNamespace(img_size=(16, 16, 3), num_classes=3)
    if defense in REFUSE_VIEW_NET:
        with pytest.raises(UserError, match=REFUSE_VIEW_NET[defense]):
            check(view_net, record, args)
    else:
        check(view_net, record, args)


def test_nad_layers_named_on_the_command_line_must_be_feature_maps_of_the_model(pieces):
    from types import SimpleNamespace

    from utils.user_models import build_user_model
    view_net = build_user_model(f"{pieces / 'tiny_nets.py'}:view_net", 3, (16, 16, 3))
    record = SimpleNamespace(img_size=(16, 16, 3), num_classes=3)
    check = MODEL_REQUIREMENTS["nad"]
    check(view_net, record, SimpleNamespace(layer_names=["conv"], betas=[500.0]))
    with pytest.raises(UserError, match="no module named 'layer2'"):
        check(view_net, record, SimpleNamespace(layer_names=["layer2"], betas=[500.0]))
    with pytest.raises(UserError, match="layer fc does not output a feature map"):
        check(view_net, record, SimpleNamespace(layer_names=["fc"], betas=[500.0]))


def test_registered_dataset_and_model_with_a_poisoned_folder_in_backdoorbench_layout(tmp_path):
    from helpers import write_synthetic_cifar10
    from utils.defense_setup import parse_defense_args, prepare_defense
    from utils.models import build_model
    _, _, test_x, test_y = write_synthetic_cifar10(tmp_path / "data" / "cifar10", train_per_batch=8, test_count=20)
    torch.manual_seed(0)
    torch.save({"module." + key: value for key, value in build_model("airbench_cpu", 10).state_dict().items()},
               tmp_path / "airbench.pth")  # a DataParallel checkpoint
    poisoned = tmp_path / "poisoned"
    assert test_y[5] == 0  # the synthetic labels cycle from 5: test image 5 is of the target class
    for index in (3, 5, 11):  # BackdoorBench's bd_test_dataset layout: <original label>/<test index>.png
        (poisoned / str(test_y[index])).mkdir(parents=True, exist_ok=True)
        Image.fromarray(255 - test_x[index]).save(poisoned / str(test_y[index]) / f"{index}.png")
    argv = ["--name", "mine", "--record_dir", str(tmp_path / "record"), "--model", "airbench_cpu", "--weights",
            str(tmp_path / "airbench.pth"), "--mean", "0.1", "0.2", "0.3", "--std", "0.5", "--clean_data", "cifar10",
            "--dataset_path", str(tmp_path / "data"), "--poisoned_folder", str(poisoned), "--target", "0"]
    assert make_record.main(argv) == 0
    record = load_attack_record(tmp_path / "record" / "mine")
    assert record.model_name == "airbench_cpu" and record.clean_data == "cifar10" and record.data_path == "./data/cifar10"
    assert record.bd_test.original_indices.tolist() == [3, 11]  # image 5, of the target class, left out
    args = parse_defense_args(ft.build_parser(), ["--result_file", "mine", "--record_dir", str(tmp_path / "record"),
                                                  "--dataset_path", str(tmp_path / "data"), "--device", "cpu"], "ft")
    setup = prepare_defense(args)  # a registered model: no --model needed, channels_last as usual
    assert setup.eval_sets.clean_test.mean.flatten().tolist() == pytest.approx([0.1, 0.2, 0.3])
    assert setup.eval_sets.bd_test.std.flatten().tolist() == pytest.approx([0.5] * 3) and not setup.notes
    assert setup.args.dataset == "cifar10" and len(setup.eval_sets.bd_test) == 2
    with pytest.raises(UserError, match="img_size"):
        make_record.main(argv[:1] + ["other"] + argv[2:] + ["--img_size", "16", "16", "3"])


def test_a_model_calling_view_gets_contiguous_input_from_the_channels_last_batches(pieces):
    import importlib.util

    from utils.user_models import build_user_model
    spec = importlib.util.spec_from_file_location("tiny_nets_raw", pieces / "tiny_nets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    x = torch.randn(2, 3, 16, 16).to(memory_format=torch.channels_last)  # as utils.tensor_data batches are
    with pytest.raises(RuntimeError, match="view"):
        module.ViewNet(3)(x)
    assert build_user_model(f"{pieces / 'tiny_nets.py'}:view_net", 3, (16, 16, 3))(x).shape == (2, 3)


def test_module_constructor_is_imported_from_the_working_folder(pieces, monkeypatch):
    monkeypatch.chdir(pieces)
    monkeypatch.delitem(sys.modules, "tiny_nets", raising=False)
    try:
        folder = build(pieces, "dotted", "tiny_nets:view_net", "view.pth", "--trigger", "badnet")
        assert load_attack_record(folder).model_name == "tiny_nets:view_net"
        assert ft.main(defense_argv(pieces, "dotted", "tiny_nets:view_net", "--epochs", "1")) == 0
    finally:
        sys.modules.pop("tiny_nets", None)
    monkeypatch.chdir(pieces / "images")
    with pytest.raises(UserError, match="cannot import tiny_nets"):
        ft.main(defense_argv(pieces, "dotted", "tiny_nets:view_net", "--epochs", "0"))


@pytest.mark.parametrize("defense", sorted(DEFENSES))
def test_every_defense_runs_on_a_plain_cnn_or_refuses_before_evaluating(defense, view_record, pieces, monkeypatch):
    """The issue's case: a CNN without BatchNorm or global pooling that calls view, at its YAML defaults."""
    import utils.defense_run as frame
    folder, spec = view_record
    calls = []
    evaluate = frame.evaluate
    monkeypatch.setattr(frame, "evaluate", lambda *a, **k: calls.append(1) or evaluate(*a, **k))
    script = load_script(f"defense/{defense}.py")
    try:
        assert script.main(defense_argv(pieces, "view", spec, "--yaml_path",
                                        f"config/defense/{defense}/config.yaml")) == 0
    except UserError:
        assert defense in {"anp", "rnp", "clp", "fp", "nad"} and not calls
        return
    assert len(calls) >= 2 and (folder / "defense" / defense / "summary.json").is_file()  # before, after (+ tables)


@pytest.mark.parametrize("backdoor", [True, False])
def test_a_trained_model_is_measured_as_it_was_trained(backdoor, pieces):
    """A backdoored ViewNet (trained here with the BadNets trigger on target 0) shows its backdoor through the record,
    a clean one does not: the record's trigger, normalisation and image order are the ones the model learnt with."""
    from own_model_pieces import train_view_net
    weights = train_view_net(pieces, backdoor)
    name = "trained_backdoored" if backdoor else "trained_clean"
    spec = f"{pieces / 'tiny_nets.py'}:view_net"
    build(pieces, name, spec, weights.name, "--trigger", "badnet")
    assert ft.main(defense_argv(pieces, name, spec, "--epochs", "1")) == 0
    before = json.loads((pieces / "record" / name / "defense" / "ft" / "summary.json").read_text())["before"]
    assert before["test_acc"] >= 0.9
    assert before["test_asr"] >= 0.9 if backdoor else before["test_asr"] <= 0.2
    if backdoor:  # the same weights under a wrong normalisation: the record's is what the defense uses
        argv = ["--name", "wrong_mean", "--record_dir", str(pieces / "record"), "--model", spec, "--weights",
                str(weights), "--mean", "0", "--std", "0.25", "--clean_data", str(pieces / "images"), "--trigger",
                "badnet", "--target", "0"]
        assert make_record.main(argv) == 0
        assert ft.main(defense_argv(pieces, "wrong_mean", spec, "--epochs", "1")) == 0
        summary = json.loads((pieces / "record" / "wrong_mean" / "defense" / "ft" / "summary.json").read_text())
        assert summary["before"]["test_acc"] <= 0.5


def test_an_image_folder_record_whose_folder_is_gone_is_one_clear_error(view_record, pieces, tmp_path):
    import shutil
    folder, spec = view_record
    copy = tmp_path / "record" / "moved"
    shutil.copytree(folder, copy, ignore=shutil.ignore_patterns("defense"))
    from utils.safe_pickle import safe_torch_load
    result = safe_torch_load(copy / "attack_result.pt")
    torch.save({**result, "data_path": str(tmp_path / "gone")}, copy / "attack_result.pt")
    argv = defense_argv(pieces, "moved", spec, "--epochs", "1")
    argv[argv.index("--record_dir") + 1] = str(tmp_path / "record")
    with pytest.raises(UserError, match="reads its clean images from the folder .*gone, which is not there"):
        ft.main(argv)
