"""NAD (defense/nad.py): the attention map and its distance, the distilled layers (named, found, or one clear
refusal), the distillation step (student pulled to the teacher's attention, teacher untouched), options, and end to
end on the shared record."""
import json

import pandas as pd
import pytest
import torch
import torch.nn as nn

from helpers import load_script, run_defense_on_shared_record
from fakes import fake_run, small_data
from utils.defense_setup import defense_defaults, parse_defense_args
from utils.errors import UserError, run_cli
from utils.models import build_model

nad = load_script("defense/nad.py")
DEFAULTS = defense_defaults(nad.build_parser(), "nad")


def test_defaults_are_backdoorbenchs_from_the_yaml():
    args = parse_defense_args(nad.build_parser(), ["--result_file", "x", "--yaml_path",
                                                      "config/defense/nad/cifar10.yaml"], "nad")
    assert (args.ratio, args.batch_size, args.te_epochs, args.epochs, args.lr, args.sgd_momentum, args.wd) == (
        0.05, 256, 10, 10, 0.01, 0.9, 0.0005)
    assert (args.layer_names, args.betas, args.p) == (["layer2", "layer3", "layer4"], [500.0, 1000.0, 1000.0], 2.0)
    tiny = parse_defense_args(nad.build_parser(), ["--result_file", "x", "--yaml_path",
                                                      "config/defense/nad/tiny.yaml"], "nad")
    assert tiny.batch_size == 128 and tiny.betas == args.betas


@pytest.mark.parametrize("extra, message", [
    (["--betas", "500", "1000"], "one beta per layer"),
    (["--betas", "-1", "1", "1"], "--betas must be >= 0"),
    (["--p", "0"], "--p"),
    (["--te_epochs", "-1"], "--te_epochs"),
])
def test_bad_options_are_clear_errors_before_anything_is_loaded(extra, message):
    with pytest.raises(UserError, match=message):
        nad.main(["--result_file", "nowhere", *extra])


def test_attention_map_is_the_channel_mean_of_the_powered_magnitude_flattened_and_unit_norm():
    features = torch.randn(4, 5, 3, 2)
    maps = nad.attention_map(features, 2.0)
    assert maps.shape == (4, 6)
    assert torch.allclose(maps.norm(dim=1), torch.ones(4))
    by_hand = (features ** 2).mean(1).flatten(1)
    assert torch.allclose(maps, by_hand / by_hand.norm(dim=1, keepdim=True))
    assert torch.allclose(nad.attention_map(-3 * features, 2.0), maps)  # sign- and scale-free
    assert torch.allclose(nad.attention_map(features, 1.0), features.abs().mean(1).flatten(1)
                          / features.abs().mean(1).flatten(1).norm(dim=1, keepdim=True))


def test_distance_is_the_mean_squared_difference_and_zero_for_the_same_map():
    student, teacher = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    expected = ((nad.attention_map(student, 2) - nad.attention_map(teacher, 2)) ** 2).mean()
    assert float(nad.attention_distance(student, teacher, 2)) == pytest.approx(float(expected))
    assert float(nad.attention_distance(student, 2 * student, 2)) == pytest.approx(0.0, abs=1e-7)


def sample():
    return torch.randn(2, 3, 32, 32)


@pytest.mark.parametrize("name, stages", [
    ("preactresnet18_w16", ["layer2", "layer3", "layer4"]),  # BackdoorBench's stages
    ("airbench_cpu", ["layers.0", "layers.1", "layers"]),
    ("resnet18", ["layer1", "layer2", "layer3"]),  # torchvision's stem quarters 32x32: layer4 is 1x1
])
def test_auto_finds_the_deepest_stages(name, stages):
    assert nad.stage_modules(build_model(name, 10), ["auto"], sample(), 3) == stages


def test_named_layers_are_kept_and_a_missing_one_is_one_line_naming_the_found_stages():
    model = build_model("airbench_cpu", 10)
    assert nad.stage_modules(model, ["layers.1", "layers.2"], sample(), 2) == ["layers.1", "layers.2"]
    with pytest.raises(UserError) as error:
        nad.stage_modules(model, ["layer2", "layer3", "layer4"], sample(), 3)
    message = str(error.value)
    assert "no module named 'layer2'" in message and "layers.0 layers.1 layers" in message and "\n" not in message


def test_a_layer_without_a_feature_map_output_is_refused():
    with pytest.raises(UserError, match="linear does not output a feature map"):
        nad.stage_modules(build_model("airbench_cpu", 10), ["layers.1", "linear"], sample(), 2)


def test_a_missing_layer_stops_the_script_with_one_error_line(tmp_path, capsys):
    """On the contract's tiny airbench_cpu record the PreAct default names are refused before any training."""
    from utils.synthetic import write_synthetic_cifar10, write_tiny_record
    cifar10 = write_synthetic_cifar10(tmp_path / "data" / "cifar10", train_per_batch=10, test_count=20)
    write_tiny_record(tmp_path / "records", "tiny", cifar10)
    with pytest.raises(SystemExit) as stop:
        run_cli(nad.main, ["--result_file", "tiny", "--record_dir", str(tmp_path / "records"), "--dataset_path",
                           str(tmp_path / "data"), "--device", "cpu", "--progress", "False", "--ratio", "0.5"])
    assert stop.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "no module named 'layer2'" in lines[0]
    assert not (tmp_path / "records" / "tiny" / "defense" / "nad").exists()


class TwoStages(nn.Module):
    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.stage1 = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2))
        self.stage2 = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.flatten(self.pool(self.stage2(self.stage1(x))), 1))


def total_distance(student, teacher, data, names):
    outputs_s, outputs_t = nad.LayerOutputs(student, names), nad.LayerOutputs(teacher, names)
    student.eval(), teacher.eval()
    with torch.no_grad():
        x = next(data.batches(len(data)))[0]
        student(x), teacher(x)
    distance = sum(float(nad.attention_distance(outputs_s.outputs[n], outputs_t.outputs[n], 2)) for n in names)
    outputs_s.remove(), outputs_t.remove()
    return distance


def test_distillation_pulls_the_students_attention_to_the_teachers_and_leaves_the_teacher_alone():
    student, teacher, data, names = TwoStages(0), TwoStages(1), small_data(32), ["stage1", "stage2"]
    teacher_state = {key: value.clone() for key, value in teacher.state_dict().items()}
    before = total_distance(student, teacher, data, names)
    run = fake_run(DEFAULTS, epochs=4, lr=0.05, betas=[500.0, 1000.0], progress=False)
    run.setup.clean_subset, run.setup.device = data, torch.device("cpu")
    rows = nad.distil(run, student, teacher, names)
    assert len(rows) == 4 and run.counted["distil"] == 4 * 32
    assert total_distance(student, teacher, data, names) < 0.5 * before
    assert all(torch.equal(value, teacher_state[key]) for key, value in teacher.state_dict().items())
    assert not student.stage1._forward_hooks and not teacher.stage2._forward_hooks  # hooks taken off


@pytest.fixture(scope="module")
def nad_run(tmp_path_factory):
    return run_defense_on_shared_record(tmp_path_factory.mktemp("nad"), "defense/nad.py",
                                        "config/defense/nad/cifar10.yaml", "--te_epochs", 1, "--epochs", 1,
                                        "--ratio", 0.002, eval_limit=100)


def test_nad_end_to_end_with_the_default_preact_layers(nad_run):
    folder, result = nad_run
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["nad"]["layers"] == ["layer2", "layer3", "layer4"] and summary["clean_samples"] == 100
    assert summary["images"]["teacher"] == 100 and summary["images"]["distil"] == 100
    for stem in ("nad_teacher_df", "nad_df"):
        assert len(pd.read_csv(folder / f"{stem}.csv")) == 1
    assert pd.read_csv(folder / "nad_df.csv")["test_acc"].iloc[-1] == pytest.approx(summary["after"]["test_acc"])
    assert "NAD: ACC" in result.stdout + result.stderr
