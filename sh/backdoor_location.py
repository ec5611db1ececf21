"""Where does a record's backdoor live: in the classifier head, or in the features below it? Analysis only (it reads
the poisoned test set), never a defense's choice.

    python sh/backdoor_location.py --result_file blended_proxy
    python sh/backdoor_location.py --result_file badnet_proxy --defenses ulrl

The backdoored model's feature extractor is frozen and a new classifier head is trained on the clean subset's
features alone (the defenses' clean share, --ratio): if the poisoned test images still land in the target class, the
features carry the backdoor and no head-only repair can remove it. Also printed: the cosine similarity between the
mean feature of the poisoned test images and each class's mean clean feature, for the backdoored model and for each
defended model under record/<result_file>/defense/<name>/ (--defenses), and each defended head row's cosine with
the backdoored one. Results go to
<record>/analysis/backdoor_location.json.
"""
import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python sh/backdoor_location.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from utils.defense_setup import defense_parser, parse_defense_args, prepare_defense  # noqa: E402
from utils.errors import UserError, run_cli  # noqa: E402
from utils.models import build_model, classifier_head, load_weights  # noqa: E402
from utils.reporting import write_json  # noqa: E402
from utils.safe_pickle import safe_torch_load  # noqa: E402
from utils.training import eval_mode, prepare_model  # noqa: E402


@torch.no_grad()  # not inference_mode: train_head uses the features in autograd
def head_inputs(model, head, data, batch_size=256):
    """What the classifier head receives for every image of `data` (eval mode)."""
    captured = []
    hook = head.register_forward_hook(lambda _module, inputs, _output: captured.append(inputs[0].flatten(1).float()))
    with eval_mode(model, hooks=[hook]):
        for x, _ in data.batches(batch_size):
            model(x)
    return torch.cat(captured)


def train_head(features, labels, num_classes, steps, lr, seed):
    """A linear head trained from scratch on fixed features: full-batch SGD with momentum, weight decay 5e-4."""
    generator = torch.Generator().manual_seed(seed)
    bound = features.shape[1] ** -0.5
    weight = (torch.rand(num_classes, features.shape[1], generator=generator) * 2 - 1) * bound
    bias = torch.zeros(num_classes)
    weight, bias = weight.to(features.device).requires_grad_(), bias.to(features.device).requires_grad_()
    optimizer = torch.optim.SGD([weight, bias], lr=lr, momentum=0.9, weight_decay=5e-4)
    for _ in range(steps):
        loss = F.cross_entropy(features @ weight.T + bias, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return weight.detach(), bias.detach(), loss.item()


def similarity_to_classes(model, head, setup):
    """Cosine of the poisoned images' mean feature with each class's mean clean-subset feature."""
    clean = head_inputs(model, head, setup.clean_subset)
    poisoned = head_inputs(model, head, setup.eval_sets.bd_test).mean(0)
    labels = setup.clean_subset.labels
    return [round(float(F.cosine_similarity(poisoned, clean[labels == k].mean(0), dim=0)), 4)
            for k in range(setup.record.num_classes)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--result_file", required=True, help="record folder name under --record_dir")
    parser.add_argument("--defenses", nargs="+", default=[], help="folder names under record/<result_file>/defense/")
    parser.add_argument("--ratio", type=float, default=0.05, help="clean share of the training split (default 0.05)")
    parser.add_argument("--steps", type=int, default=300, help="full-batch steps of head training (default 300)")
    parser.add_argument("--lr", type=float, default=0.05, help="head training learning rate (default 0.05)")
    parser.add_argument("--eval_limit", type=int, default=0, help="first N images of each test set only (0: all)")
    parser.add_argument("--record_dir", default="record")
    parser.add_argument("--dataset_path", default="data")
    args = parser.parse_args(argv)
    options = parse_defense_args(defense_parser("backdoor location"), [
        "--result_file", args.result_file, "--record_dir", args.record_dir, "--dataset_path", args.dataset_path,
        "--ratio", str(args.ratio), "--eval_limit", str(args.eval_limit), "--progress", "False"])
    setup = prepare_defense(options)
    num_classes, model = setup.record.num_classes, setup.model
    _, head = classifier_head(model, num_classes, None)
    clean_features = head_inputs(model, head, setup.clean_subset)
    weight, bias, loss = train_head(clean_features, setup.clean_subset.labels, num_classes, args.steps, args.lr,
                                    options.random_seed)

    def predicted(data):
        return (head_inputs(model, head, data) @ weight.T + bias).argmax(1)

    clean_test, bd_test = setup.eval_sets.clean_test, setup.eval_sets.bd_test
    result = {
        "record": setup.record.name, "clean_samples": len(setup.clean_indices),
        "retrained_head": {
            "train_loss": round(loss, 4),
            "test_acc": float((predicted(clean_test) == clean_test.labels).float().mean()),
            "test_asr": float((predicted(bd_test) == bd_test.labels).float().mean()),
        },
        "poisoned_mean_cosine_to_class_means": {"backdoored": similarity_to_classes(model, head, setup)},
    }
    for name in args.defenses:
        path = setup.record.folder / "defense" / name / "defense_result.pt"
        if not path.is_file():
            raise UserError(f"no defended model at {path}")
        defended = load_weights(build_model(setup.record.model_name, num_classes, setup.record.img_size),
                                safe_torch_load(path)["model"], str(path))
        defended = prepare_model(defended, setup.device)
        _, defended_head = classifier_head(defended, num_classes, None)
        result["poisoned_mean_cosine_to_class_means"][name] = similarity_to_classes(defended, defended_head, setup)
        result.setdefault("head_row_cosine_to_backdoored", {})[name] = [  # -1: a row turned to its opposite
            round(float(c), 4) for c in F.cosine_similarity(defended_head.weight.detach().float().flatten(1),
                                                          head.weight.detach().float().flatten(1), dim=1)]
    out = setup.record.folder / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "backdoor_location.json", result)
    retrained = result["retrained_head"]
    print(f"{setup.record.name}: a head retrained on {len(setup.clean_indices)} clean images over the frozen "
          f"backdoored features: ACC {retrained['test_acc']:.4f}, ASR {retrained['test_asr']:.4f}")
    for name, cosines in result["poisoned_mean_cosine_to_class_means"].items():
        print(f"{name}: cosine of the poisoned mean feature with each class's clean mean: {cosines}")
    for name, cosines in result.get("head_row_cosine_to_backdoored", {}).items():
        print(f"{name}: cosine of each head row with the backdoored model's: {cosines}")
    print(f"written: {out / 'backdoor_location.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
