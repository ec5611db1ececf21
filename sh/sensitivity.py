"""How a defense's result moves with its hyperparameters: one option varied at a time around a config, each run on
the same record, one row per run (ACC, ASR, RA, DER, seconds). Analysis only: the rows read the test sets, so they
show where a default sits (a plateau or a spike); no defense chooses anything from them.

    python sh/sensitivity.py --result_file badnet_proxy --vary ratio=0.01,0.05 unlearning_lr=0.005,0.01,0.02
    python sh/sensitivity.py --result_file blended_proxy --defense ulrl --yaml_path config/defense/ulrl/reference.yaml \
        --vary max_neurons=1,2,4 scope=head,all

The first row is the config itself (config/defense/<defense>/config.yaml, then --yaml_path); each --vary KEY=V1,V2
adds one row per value that differs from the config's. --set KEY=V applies to every row (e.g. eval_limit=2000 for
a quick look; such rows say so). Writes <out>/sensitivity_<defense>.csv and .md (default out:
record/<result_file>/analysis); nothing under the record's defense/ folder changes.
"""
import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python sh/sensitivity.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from defense_api import defend, defense_script  # noqa: E402
from utils.defense_setup import parse_defense_args  # noqa: E402
from utils.errors import UserError, run_cli  # noqa: E402
from utils.reporting import write_table  # noqa: E402


def key_values(text, option):
    """'key=v1,v2' -> ('key', ['v1', 'v2'])."""
    key, sep, values = text.partition("=")
    if not sep or not key or not values:
        raise UserError(f"{option} {text!r}: expected KEY=VALUE[,VALUE...]")
    return key, values.split(",")


def base_options(defense, record, yaml_path, fixed):
    """The config's value of every option (as parsed), so that a varied value equal to it is not run twice."""
    script = defense_script(defense)
    argv = ["--result_file", record] + (["--yaml_path", yaml_path] if yaml_path else [])
    for key, value in fixed.items():
        argv += [f"--{key}", value]
    return vars(parse_defense_args(script.build_parser(), argv, defense))


def runs(defense, record, yaml_path, varied, fixed):
    """[(label, options)]: the config, then one run per differing value of each varied option."""
    config = base_options(defense, record, yaml_path, fixed)
    plan = [("config", {})]
    for key, values in varied:
        if key not in config:
            raise UserError(f"--vary {key}: {defense} has no option --{key}")
        for value in values:
            parsed = base_options(defense, record, yaml_path, {**fixed, key: value})[key]
            if parsed != config[key]:
                plan.append((f"{key}={value}", {key: value}))
    return config, plan


def describe_selection(selected):
    """ULRL's {layer: [neurons]} in a few words; other defenses' summaries have no such key."""
    if not isinstance(selected, dict):
        return ""
    if len(selected) <= 2:
        return "; ".join(f"{layer} {neurons}" for layer, neurons in selected.items()) or "none"
    return f"{sum(map(len, selected.values()))} neurons in {len(selected)} layers"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--result_file", required=True, help="the record (a folder name under --record_dir)")
    parser.add_argument("--defense", default="ulrl", help="default: ulrl")
    parser.add_argument("--yaml_path", help="the config the rows vary around (over config/defense/<defense>/config.yaml)")
    parser.add_argument("--vary", nargs="+", default=[], metavar="KEY=V1,V2", help="options to vary, one at a time")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=V", help="options fixed for every row")
    parser.add_argument("--record_dir", default="record")
    parser.add_argument("--out", help="default: <record_dir>/<result_file>/analysis")
    args = parser.parse_args(argv)
    fixed = dict((key, values[0]) for key, values in (key_values(item, "--set") for item in args.set))
    fixed["record_dir"] = args.record_dir
    varied = [key_values(item, "--vary") for item in args.vary]
    config, plan = runs(args.defense, args.result_file, args.yaml_path, varied, fixed)
    limited = f" (first {config['eval_limit']} test images of each set)" if config.get("eval_limit") else ""
    rows = []
    for label, change in plan:
        options = {"yaml_path": args.yaml_path, **fixed, **change}
        tick = time.perf_counter()
        result = defend(args.defense, args.result_file, options=options, record_dir=args.record_dir)
        row = {"run": label, "acc": result.after["test_acc"], "asr": result.after["test_asr"],
               "ra": result.after["test_ra"], "der": result.summary["der"], "seconds": time.perf_counter() - tick,
               "selected": describe_selection(result.summary.get("selected"))}
        rows.append(row)
        print(f"{label}: ACC {row['acc']:.4f} ASR {row['asr']:.4f} RA {row['ra']:.4f} DER {row['der']:.4f} "
              f"({row['seconds']:.0f} s)", flush=True)
    before = result.before
    out = Path(args.out or Path(args.record_dir) / args.result_file / "analysis")
    out.mkdir(parents=True, exist_ok=True)
    write_table(rows, out / f"sensitivity_{args.defense}.csv")
    lines = [f"Analysis (reads the test sets{limited}): {args.defense} on {args.result_file}, one option varied at a "
             f"time around {args.yaml_path or 'its config.yaml'}"
             + (f" with {' '.join(args.set)}" if args.set else "")
             + f". Backdoored: ACC {before['test_acc']:.4f}, ASR {before['test_asr']:.4f}.", "",
             "| run | ACC | ASR | RA | DER | seconds | selected |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['run']} | {r['acc']:.4f} | {r['asr']:.4f} | {r['ra']:.4f} | {r['der']:.4f} | {r['seconds']:.0f} | "
              f"{r['selected']} |" for r in rows]
    (out / f"sensitivity_{args.defense}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
