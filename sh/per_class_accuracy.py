"""Clean test accuracy per class of a record's backdoored model and of its defended models: where a defense's
accuracy loss sits (for ULRL: in the classes whose head rows it re-initialised, or everywhere).

    python sh/per_class_accuracy.py --result_file badnet_proxy --defenses ulrl ft
    python sh/per_class_accuracy.py --result_file badnet_proxy --defenses ulrl --out per_class

Reads record/<result_file>/attack_result.pt and record/<result_file>/defense/<name>/defense_result.pt for each
--defenses name (any folder name under defense/); writes per_class_accuracy.csv (class x model) and
per_class_accuracy.png beside it, in --out (default: record/<result_file>/analysis).
"""
import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python sh/per_class_accuracy.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from utils.defense_setup import defense_parser, parse_defense_args, prepare_defense  # noqa: E402
from utils.errors import UserError, run_cli  # noqa: E402
from utils.models import build_model, load_weights  # noqa: E402
from utils.safe_pickle import safe_torch_load  # noqa: E402
from utils.reporting import write_table  # noqa: E402
from utils.training import predict, prepare_model  # noqa: E402


def per_class_accuracy(model, data, num_classes):
    predictions, _ = predict(model, data, 256)
    labels = torch.as_tensor(data.labels).to(predictions.device)
    return [float((predictions[labels == k] == k).float().mean()) for k in range(num_classes)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--result_file", required=True, help="record folder name under --record_dir")
    parser.add_argument("--defenses", nargs="+", default=[], help="folder names under record/<result_file>/defense/")
    parser.add_argument("--record_dir", default="record")
    parser.add_argument("--dataset_path", default="data")
    parser.add_argument("--out", help="default: <record_dir>/<result_file>/analysis")
    args = parser.parse_args(argv)
    options = parse_defense_args(defense_parser("per-class accuracy"), [
        "--result_file", args.result_file, "--record_dir", args.record_dir, "--dataset_path", args.dataset_path,
        "--progress", "False"])
    setup = prepare_defense(options)
    num_classes = setup.record.num_classes
    columns = {"backdoored": per_class_accuracy(setup.model, setup.eval_sets.clean_test, num_classes)}
    for name in args.defenses:
        path = setup.record.folder / "defense" / name / "defense_result.pt"
        if not path.is_file():
            raise UserError(f"no defended model at {path}")
        saved = safe_torch_load(path)
        model = load_weights(build_model(setup.record.model_name, num_classes, setup.record.img_size), saved["model"],
                             str(path))
        columns[name] = per_class_accuracy(prepare_model(model, setup.device), setup.eval_sets.clean_test,
                                           num_classes)
    table = pd.DataFrame(columns)
    table.insert(0, "class", range(num_classes))
    out = Path(args.out or setup.record.folder / "analysis")
    out.mkdir(parents=True, exist_ok=True)
    write_table(table.to_dict("records"), out / "per_class_accuracy.csv")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axis = plt.subplots(figsize=(max(6, num_classes * 0.9), 3.5))
    width = 0.8 / len(columns)
    for i, name in enumerate(columns):
        axis.bar([k + (i - (len(columns) - 1) / 2) * width for k in range(num_classes)], table[name], width, label=name)
    axis.set(xlabel="class", ylabel="clean test accuracy", title=f"{setup.record.name}: accuracy per class",
             xticks=range(num_classes), ylim=(0, 1))
    axis.legend(fontsize=8, ncol=len(columns))
    figure.tight_layout()
    figure.savefig(out / "per_class_accuracy.png", dpi=110)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"written: {out / 'per_class_accuracy.csv'}, {out / 'per_class_accuracy.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
