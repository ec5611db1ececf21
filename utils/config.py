"""Configuration: argparse options merged with a YAML file, BackdoorBench style (command line > YAML > defaults).

Unlike BackdoorBench, booleans and lists parse correctly on the command line (`--amp False` is False,
`--steplr_milestones 10 20` is a list), and YAML strings are converted with the option's own type.
"""
import argparse
from pathlib import Path

import yaml

from utils.errors import UserError

REPO_ROOT = Path(__file__).resolve().parent.parent


def str2bool(text):
    """argparse type for booleans: true/false, yes/no, 1/0, on/off (any case)."""
    if isinstance(text, bool):
        return text
    value = str(text).strip().lower()
    if value in ("true", "yes", "1", "on", "t", "y"):
        return True
    if value in ("false", "no", "0", "off", "f", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {text!r}")


def none_or_str(text):
    """argparse type for an optional string: 'none', 'null' or '' mean None."""
    return None if str(text).strip().lower() in ("", "none", "null") else text


def none_or_float(text):
    """argparse type for an optional number: 'none', 'null' or '' mean None."""
    return None if str(text).strip().lower() in ("", "none", "null") else float(text)


def read_yaml(path):
    """A YAML mapping from `path` (relative to the working directory, else to the repository root)."""
    candidate = Path(path)
    if not candidate.is_file() and not candidate.is_absolute() and (REPO_ROOT / candidate).is_file():
        candidate = REPO_ROOT / candidate
    if not candidate.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        values = yaml.safe_load(candidate.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"config file {path} is not valid YAML: {err}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UserError(f"config file {path} must hold a mapping of option: value, not {type(values).__name__}")
    return values


def _coerce(action, value, source):
    """Convert a YAML value with the argparse action's type, so YAML and command line give the same types."""
    if value is None or action.type is None:
        return value
    many = action.nargs in ("+", "*") or isinstance(action.nargs, int)
    try:
        if many:
            items = value if isinstance(value, (list, tuple)) else [value]
            return [action.type(item) for item in items]
        if isinstance(value, (list, tuple, dict)):
            raise ValueError(f"expected one value, got {value!r}")
        return action.type(value)
    except (ValueError, TypeError, argparse.ArgumentTypeError) as err:
        raise UserError(f"{source}: option {action.dest}: {err}") from None


def read_defaults(parser, paths):
    """The values of the YAML files `paths` merged in order (later wins), each converted with its option's type."""
    actions = {action.dest: action for action in parser._actions}
    merged = {}
    for path in paths:
        for key, value in read_yaml(path).items():
            merged[key] = _coerce(actions[key], value, path) if key in actions else value
    return merged


def show_defaults(parser, defaults):
    """Write each option's default (from the YAML files) into its help, and name the accepted booleans, so that
    --help tells what a run would use."""
    for action in parser._actions:
        if action.dest == "help":
            continue
        if action.type is str2bool:
            action.metavar = "{true,false}"
        if action.dest in defaults:
            value = defaults[action.dest]
            if isinstance(value, bool):
                shown = str(value).lower()
            elif isinstance(value, (list, tuple)):
                shown = " ".join(map(str, value))
            else:
                shown = value
            action.help = f"{action.help or ''} (default: {shown})".strip()


def parse_config(parser, argv, defaults, yaml_options=("yaml_path",)):
    """Parse `argv`, then merge: command-line values (not None) over the YAML files over `defaults`.

    `yaml_options` name the options holding YAML paths, lowest priority first (attacks: the prototype YAML, then
    the attack's own). Every parser option must default to None, so that "not given" is distinguishable from a
    value. Returns an argparse.Namespace with every key of defaults, of the YAML files and of the parser.
    """
    args = parser.parse_args(argv)
    given = {key: value for key, value in vars(args).items() if value is not None}
    actions = {action.dest: action for action in parser._actions}
    merged = dict(defaults)
    for option in yaml_options:
        yaml_path = given.get(option, defaults.get(option))
        from_yaml = read_yaml(yaml_path) if yaml_path else {}
        for key, value in from_yaml.items():
            merged[key] = _coerce(actions[key], value, yaml_path) if key in actions else value
        merged[option] = yaml_path
    merged.update(given)
    for key in vars(args):
        merged.setdefault(key, None)
    return argparse.Namespace(**merged)


def require(condition, message):
    """End the run with `message` (one line, exit status 2, via UserError) unless `condition` holds."""
    if not condition:
        raise UserError(message)


def _because(why):
    return f" ({why})" if why else ""


def require_at_least(args, bound, *names, why=""):
    """Each option in `names` is >= bound ("--name must be >= bound"); NaN is rejected too."""
    for name in names:
        require(getattr(args, name) >= bound, f"--{name} must be >= {bound}{_because(why)}")


def require_above(args, bound, *names, why=""):
    """Each option in `names` is > bound ("--name must be > bound"); NaN is rejected too."""
    for name in names:
        require(getattr(args, name) > bound, f"--{name} must be > {bound}{_because(why)}")


def within(value, interval):
    """Whether `value` lies in `interval`, written as a message shows it: "[0, 1]", "(0, 1]", "[0, 0.5)"."""
    low, high = (float(end) for end in interval[1:-1].split(","))
    above = value > low if interval[0] == "(" else value >= low
    below = value < high if interval[-1] == ")" else value <= high
    return above and below


def require_in(args, name, interval, why=""):
    """Option `name` lies in `interval` ("--name must be in [0, 1], got 2")."""
    value = getattr(args, name)
    require(within(value, interval), f"--{name} must be in {interval}, got {value}{_because(why)}")
