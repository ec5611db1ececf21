"""Configuration merging: command line > YAML > defaults, with correct booleans and lists."""
import argparse

import pytest

from utils.config import parse_config, require_above, require_at_least, require_in, str2bool, within
from utils.errors import UserError


def _parser():
    parser = argparse.ArgumentParser()
    parser.add_argument("--yaml_path", type=str)
    parser.add_argument("--init", type=str2bool)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--milestones", type=int, nargs="+")
    parser.add_argument("--name", type=str)
    return parser


def _yaml(tmp_path, text):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


def test_command_line_over_yaml_over_defaults(tmp_path):
    path = _yaml(tmp_path, "lr: 0.5\nname: from_yaml\nextra_key: 7\n")
    args = parse_config(_parser(), ["--yaml_path", path, "--name", "from_cli"],
                        {"lr": 0.1, "name": "default", "init": True, "only_default": 3})
    assert args.name == "from_cli"
    assert args.lr == 0.5
    assert args.init is True
    assert args.only_default == 3
    assert args.extra_key == 7
    assert args.milestones is None


@pytest.mark.parametrize("text,expected", [("False", False), ("false", False), ("0", False), ("no", False),
                                           ("True", True), ("yes", True), ("1", True)])
def test_booleans_parse_on_the_command_line(text, expected):
    args = parse_config(_parser(), ["--init", text], {"init": not expected})
    assert args.init is expected


def test_bad_boolean_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(_parser(), ["--init", "maybe"], {})
    assert exit_info.value.code == 2
    assert "expected a boolean" in capsys.readouterr().err


def test_lists_parse_on_the_command_line_and_in_yaml(tmp_path):
    assert parse_config(_parser(), ["--milestones", "5", "15"], {}).milestones == [5, 15]
    path = _yaml(tmp_path, "milestones: ['3', 9]\ninit: 'False'\nlr: '1e-3'\n")
    args = parse_config(_parser(), ["--yaml_path", path], {})
    assert args.milestones == [3, 9]
    assert args.init is False
    assert args.lr == pytest.approx(1e-3)
    assert parse_config(_parser(), ["--yaml_path", _yaml(tmp_path, "milestones: 4\n")], {}).milestones == [4]


def test_yaml_problems_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        parse_config(_parser(), ["--yaml_path", str(tmp_path / "missing.yaml")], {})
    with pytest.raises(UserError, match="mapping"):
        parse_config(_parser(), ["--yaml_path", _yaml(tmp_path, "- a\n- b\n")], {})
    with pytest.raises(UserError, match="not valid YAML"):
        parse_config(_parser(), ["--yaml_path", _yaml(tmp_path, "a: [1, 2\n")], {})
    with pytest.raises(UserError, match="option lr"):
        parse_config(_parser(), ["--yaml_path", _yaml(tmp_path, "lr: fast\n")], {})


def test_shipped_ulrl_configs_hold_the_reference_values_but_the_clean_share():
    from helpers import load_script
    from utils.defense_setup import parse_defense_args
    ulrl = load_script("defense/ulrl.py")
    for name, lr, alpha, ratio, scope in (("config", 0.005, 3.0, 0.05, "all"), ("cifar10", 0.005, 3.0, 0.05, "all"),
                                          ("reference", 0.005, 0.7, 0.01, "head"),
                                          ("cifar100", 0.001, 0.001, 0.05, "all"), ("gtsrb", 0.001, 0.001, 0.05, "all"),
                                          ("tiny", 0.001, 0.001, 0.05, "all")):
        args = parse_defense_args(ulrl.build_parser(), ["--result_file", "x", "--yaml_path",
                                                        f"config/defense/ulrl/{name}.yaml"], "ulrl")
        assert (args.relearn_lr, args.relearn_alpha) == (lr, alpha)
        assert args.unlearning_epochs == 20 and args.relearn_epochs == 20 and args.steplr_milestones == [10, 20]
        assert args.clean_threshold == 0.2 and args.ratio == ratio and args.init is True and args.amp == "auto"
        assert args.selection == "first" and args.max_neurons == 2 and args.scope == scope
    overridden = parse_defense_args(ulrl.build_parser(), ["--result_file", "x", "--init", "False",
                                                          "--steplr_milestones", "3", "6"], "ulrl")
    assert overridden.init is False and overridden.steplr_milestones == [3, 6]


def test_two_yaml_files_merge_in_order(tmp_path):
    parser = _parser()
    parser.add_argument("--bd_yaml_path", type=str)
    prototype = tmp_path / "prototype.yaml"
    prototype.write_text("lr: 0.1\nname: prototype\nmilestones: [1]\n")
    attack = tmp_path / "attack.yaml"
    attack.write_text("name: attack\ninit: 'no'\n")
    args = parse_config(parser, ["--yaml_path", str(prototype), "--bd_yaml_path", str(attack), "--lr", "0.3"],
                        {"lr": 1.0, "name": "default", "init": True},
                        yaml_options=("yaml_path", "bd_yaml_path"))
    assert (args.lr, args.name, args.init, args.milestones) == (0.3, "attack", False, [1])
    assert args.yaml_path == str(prototype) and args.bd_yaml_path == str(attack)


@pytest.mark.parametrize("value, interval, inside", [
    (0.0, "[0, 1]", True), (1.0, "[0, 1]", True), (0.0, "(0, 1]", False), (1.0, "[0, 1)", False),
    (0.5, "(0, 1)", True), (0.5, "[0, 0.5)", False), (float("nan"), "[0, 1]", False)])
def test_within_reads_the_interval_as_written(value, interval, inside):
    assert within(value, interval) is inside


def test_option_checks_name_the_option_and_the_rule_in_one_line():
    args = argparse.Namespace(epochs=-1, lr=0.0, alpha=2.0, ok=3)
    require_at_least(args, 0, "ok")
    with pytest.raises(UserError, match=r"^--epochs must be >= 0 \(a count\)$"):
        require_at_least(args, 0, "ok", "epochs", why="a count")
    with pytest.raises(UserError, match=r"^--lr must be > 0$"):
        require_above(args, 0, "lr")
    with pytest.raises(UserError, match=r"^--alpha must be in \[0, 1\], got 2.0$"):
        require_in(args, "alpha", "[0, 1]")
    with pytest.raises(UserError, match="--lr"):
        require_above(argparse.Namespace(lr=float("nan")), 0, "lr")
