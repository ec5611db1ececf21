"""Your own backdoored model, data and trigger as a BackdoorBench record that every defense reads; optionally run
defenses on it at once.

    python sh/make_record.py --name my_cnn --model my_nets.py:Net --weights my_cnn.pth \\
        --mean 0.5 0.5 0.5 --std 0.5 0.5 0.5 --clean_data ~/my_images --trigger badnet --target 0 \\
        --defenses ulrl ft -- --ratio 0.05

The model: a registered name, `module:function` or `file.py:function` (called with num_classes / img_size where it
takes them) with --weights (a state_dict, read without running code), or --model_file (a whole pickled model) with
--trust_model_file true. Clean data: a registered dataset name or a folder with train/<class>/ and test/<class>/.
Backdoor test set: --trigger (stamped on every clean test image not of --target) or --poisoned_folder
(<class>/<file> poisoned copies of clean test images). The record goes to <record_dir>/<name>/; options after `--`
go to every defense. Defaults: config/own_model/config.yaml. Details: docs/own_model.md.
"""
import argparse
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python sh/make_record.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.catalog import DEFENSES  # noqa: E402
from utils.config import REPO_ROOT, none_or_str, parse_config, read_defaults, show_defaults, str2bool  # noqa: E402
from utils.datasets import DATASETS  # noqa: E402
from utils.errors import UserError, run_cli  # noqa: E402
from utils.own_record import make_own_record  # noqa: E402

DEFAULTS = REPO_ROOT / "config" / "own_model" / "config.yaml"


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     usage="%(prog)s --name NAME --model SPEC --weights FILE --mean M.. --std S.. "
                                           "--clean_data DATA (--trigger T | --poisoned_folder DIR) --target Y "
                                           "[--defenses D ...] [-- defense options]")
    add = parser.add_argument
    add("--name", type=str, help="(required) record folder name under --record_dir")
    add("--record_dir", type=str, help="where the record folder is written")
    add("--model", type=none_or_str, help="registered model name, module:function or file.py:function")
    add("--weights", type=none_or_str, help="state_dict file of the model (torch.save(model.state_dict()))")
    add("--model_file", type=none_or_str, help="a whole model saved with torch.save(model) (needs trust)")
    add("--trust_model_file", type=str2bool, help="unpickle --model_file, which can run code from it")
    add("--mean", type=float, nargs="+", help="(required) input normalisation mean, 1 or C values")
    add("--std", type=float, nargs="+", help="(required) input normalisation std, 1 or C values")
    add("--clean_data", type=str, help="(required) registered dataset name, or a folder with train/ and test/")
    add("--dataset_path", type=str, help="folder holding <dataset>/ for a registered dataset")
    add("--img_size", type=int, nargs=3, metavar=("H", "W", "C"), help="image size the model takes")
    add("--trigger", type=none_or_str, help="registered trigger stamped on the clean test images")
    add("--poisoned_folder", type=none_or_str, help="folder of poisoned test images, <class>/<file>")
    add("--target", type=int, help="(required) the backdoor's target label")
    add("--defenses", type=str, nargs="*", help="defenses to run on the record: " + ", ".join(DEFENSES))
    return parser


def parse_args(argv):
    parser = build_parser()
    defaults = read_defaults(parser, [DEFAULTS])
    show_defaults(parser, defaults)
    args = parse_config(parser, argv, defaults, yaml_options=())
    for option in ("name", "clean_data", "target"):
        if getattr(args, option) is None:
            raise UserError(f"--{option} is required (python sh/make_record.py --help)")
    if "/" in args.name or args.name in ("", ".", ".."):
        raise UserError(f"--name {args.name!r} must be a plain folder name")
    for defense in args.defenses:
        DEFENSES.lookup(defense)
    return args


def defense_command(defense, args, spec, extra):
    """The command line of one defense on the new record (its <dataset>.yaml when it has one)."""
    command = [sys.executable, str(REPO_ROOT / "defense" / f"{defense}.py"), "--result_file", args.name,
               "--record_dir", str(args.record_dir), "--model", spec, "--dataset_path", str(args.dataset_path)]
    dataset_yaml = REPO_ROOT / "config" / "defense" / defense / f"{args.clean_data}.yaml"
    if args.clean_data in DATASETS and dataset_yaml.is_file():
        command += ["--yaml_path", str(dataset_yaml)]
    return command + list(extra)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    args = parse_args(argv)
    folder, spec = make_own_record(
        Path(args.record_dir) / args.name, model=args.model, weights=args.weights, model_file=args.model_file,
        trust_model_file=args.trust_model_file, clean_data=args.clean_data, mean=args.mean, std=args.std,
        img_size=args.img_size, trigger_name=args.trigger, poisoned_folder=args.poisoned_folder, target=args.target,
        dataset_path=args.dataset_path)
    if not args.defenses:
        print(f"defend it with: python defense/<defense>.py --result_file {args.name} --record_dir {args.record_dir} "
              f"--model {spec}")
    failed = []
    for defense in args.defenses:
        command = defense_command(defense, args, spec, extra)
        print(f"running {defense}: {' '.join(command[1:])}", flush=True)
        if subprocess.run(command).returncode != 0:
            failed.append(defense)
    if failed:
        print(f"error: {', '.join(failed)} failed on {folder} (the record is kept)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
