"""Choosing with clean data only: a held-out share of the clean subset, and the two tolerance rules that pick the
strongest setting (pruning amount, TSBD's n) whose held-out clean accuracy stays within an absolute tolerance of the
unchanged model's. Apart from them, the labelled test-set sweep (LabelledSweep): an analysis the defenses offer
with --sweep, which reads the test sets and therefore never chooses anything."""
import torch

from utils.errors import UserError
from utils.reporting import write_table
from utils.tensor_data import subset

# 0.93 - 0.05 is 0.8800000000000001: an accuracy exactly at the bound is within it
BOUND_SLACK = 1e-12


def holdout_split(data, share, generator, what="the clean subset"):
    """(the rest, the held-out part) of `data` (a DeviceImages): a random round(len * share) samples, at least one,
    held out, drawn with `generator`; both parts keep their original order."""
    held = max(1, int(round(len(data) * share)))
    if held >= len(data):
        raise UserError(f"holding out {share} of {len(data)} samples of {what} leaves none to learn from")
    order = torch.randperm(len(data), generator=generator).tolist()
    return subset(data, sorted(order[held:])), subset(data, sorted(order[:held]))


def largest_within_tolerance(amounts, accuracies, baseline, tolerance):
    """For settings that are cheap to judge (all are judged): the largest amount whose accuracy is at least
    baseline - tolerance; None if none is. A curve that dips and recovers is judged point by point."""
    within = [amount for amount, acc in zip(amounts, accuracies) if acc >= baseline - tolerance - BOUND_SLACK]
    return max(within) if within else None


def largest_accepted(candidates, heldout_accuracy, reference, tolerance):
    """For settings that are expensive to judge (each needs training): walk `candidates` in increasing order while
    heldout_accuracy(c) -> (accuracy, details) stays >= reference - tolerance; the first rejection ends the walk.
    Returns the last accepted candidate (0.0 when the first is rejected) and one row per candidate tried."""
    chosen, rows = 0.0, []
    for candidate in sorted(candidates):
        acc, details = heldout_accuracy(candidate)
        accepted = acc >= reference - tolerance - BOUND_SLACK
        rows.append({"n": candidate, **details, "heldout_acc": acc, "accepted": accepted})
        if not accepted:
            break
        chosen = candidate
    return chosen, rows


def sweep_help(what):
    """The --sweep help text: `what` it writes, and that it reads the test sets."""
    return f"ANALYSIS ONLY, READS THE TEST SETS: {what}; never used to choose the saved model"


class LabelledSweep:
    """The reference codes' way to pick a setting (BackdoorBench's oracle choice), kept as an analysis only: the
    test metrics of one model per setting, each added to the setting's row and logged in one line, the images
    counted under `phase` (the caller times it); `write` saves the rows to `file_name` and says what they are."""

    def __init__(self, run, phase, file_name, per):
        self.run, self.phase, self.file_name, self.per = run, phase, file_name, per

    def measure(self, model, row, label):
        """`row` with `model`'s test metrics added; logged as `label: test ACC .., ASR .., RA ..`."""
        run = self.run
        row.update(run.evaluate(model))
        run.count_images(self.phase, run.setup.eval_sets.images())
        run.logger.info(f"{label}: test ACC {row['test_acc']:.4f}, ASR {row['test_asr']:.4f}, "
                        f"RA {row['test_ra']:.4f}")
        return row

    def write(self, rows):
        write_table(rows, self.run.path / self.file_name)
        self.run.logger.info(f"{self.file_name} holds TEST-set metrics per {self.per} (an analysis, like "
                             "BackdoorBench's oracle choice); the saved model was chosen without them")
