"""The frame every defense script runs in, so a script holds only its own algorithm.

    def defend(run):            # the algorithm: returns the defended model (on run.device)
        with run.phase("finetune"):
            ...
        return model

    def main(argv=None):
        return run_defense(build_parser(), argv, "ft", defend)

run_defense parses the options, prepares the record/data/model (utils.defense_setup), opens
record/<name>/defense/<defense>/ (built aside, renamed into place when the run succeeds), writes the clean-subset
index, evaluates before and after, saves defense_result.pt, the per-epoch CSVs/plots the algorithm registered,
summary.json and the one-line summary (ACC, ASR, RA before -> after, DER, seconds).
"""
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from utils.catalog import DEFENSES
from utils.defense_setup import parse_defense_args, prepare_defense
from utils.model_requirements import model_check
from utils.models import cpu_state_dict
from utils.reporting import (OutputFolder, der, plot_epochs, save_defense_result, setup_logger, summary_line,
                             write_epoch_csvs, write_index, write_json)
from utils.runtime import peak_memory_mib
from utils.training import evaluate


class DefenseRun:
    """What a defense's algorithm works with: the setup (record, device, model, clean subset, test sets), the
    options, the output folder, the logger, a seeded generator, timed phases and the extra summary values."""

    def __init__(self, setup, folder, logger, defense):
        self.setup, self.args, self.path, self.logger, self.defense = setup, setup.args, folder, logger, defense
        self.device = setup.device
        self.generator = torch.Generator().manual_seed(setup.args.random_seed)
        self.seconds = dict(setup.seconds)
        self.images = {name: 0 for name in self.seconds}
        self.summary = {}  # extra keys for summary.json (selected neurons, chosen thresholds, ...)
        self.epoch_tables = {}  # stem -> per-epoch rows; the last one registered gets the final metrics

    @contextmanager
    def phase(self, name):
        """Time a phase (accumulates when entered again); add processed images with count_images."""
        tick = time.perf_counter()
        self.images.setdefault(name, 0)
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - tick

    def count_images(self, phase, count):
        self.images[phase] = self.images.get(phase, 0) + int(count)

    def evaluate(self, model):
        return evaluate(model, self.setup.eval_sets, self.args.eval_batch_size, self.args.progress)

    def epoch_row(self, epoch, stats, model, force_eval=False):
        """A per-epoch CSV row from train_epoch's stats; test metrics on the epochs --eval_every asks for."""
        row = {"epoch": epoch, "batch": stats.batches, "train_epoch_loss_avg_over_batch": stats.loss,
               "train_acc": stats.acc}
        every = self.args.eval_every
        if force_eval or (every and (epoch + 1) % every == 0):
            row.update(self.evaluate(model))
        return row

    def end_epoch(self, rows, phase, epoch, stats, model, message=None, images=None, force_eval=False):
        """An epoch's bookkeeping in one call: its row (test metrics on the epochs --eval_every asks for, or with
        force_eval) appended to `rows`; the images it processed (`images`, default stats.samples) counted under
        `phase`, with the test images when it was evaluated; `message` logged with the test metrics appended."""
        row = self.epoch_row(epoch, stats, model, force_eval)
        rows.append(row)
        tested = {key: value for key, value in row.items() if key.startswith("test_")}
        self.count_images(phase, (stats.samples if images is None else images)
                          + (self.setup.eval_sets.images() if tested else 0))
        if message is not None:
            self.logger.info(message + "".join(f", {key} {value:.4f}" for key, value in tested.items()))
        return row

    def add_epoch_table(self, stem, rows):
        """Rows written as <stem>.csv, <stem>_summary.csv and plots at the end of the run."""
        self.epoch_tables[stem] = rows

    def log_metrics(self, label, metrics):
        self.logger.info(f"{label}: " + ", ".join(f"{key} {value:.4f}" for key, value in metrics.items()))


@dataclass
class DefenseResult:
    """What a defense run gives back (utils.defense_run.defend_with; defense_api.py for notebooks)."""
    model: torch.nn.Module  # the defended model, on the run's device
    before: dict  # test metrics of the backdoored model
    after: dict  # test metrics of the defended model
    summary: dict  # everything summary.json holds
    folder: Path = None  # record/<name>/defense/<defense>/, or None when nothing was kept


def run_defense(parser, argv, defense, algorithm, check_args=None):
    """Run `algorithm(run) -> defended model` inside the standard frame for the registered `defense` (its title, as
    papers write it, heads the log and the summary line); returns the exit status 0.
    `check_args(args)` validates the defense's own options (raise UserError) before anything is loaded."""
    args = parse_defense_args(parser, argv, defense)
    if check_args is not None:
        check_args(args)
    result = defend_with(args, defense, algorithm)
    print(f"results in {result.folder}")
    return 0


def defend_with(args, defense, algorithm, keep_files=True):
    """The run itself on parsed options; returns a DefenseResult. Without `keep_files` the outputs are written to
    a temporary folder that is removed afterwards (the defenses write their tables as they go)."""
    DEFENSES.lookup(defense)
    started = time.perf_counter()
    setup = prepare_defense(args, check_model=model_check(defense))  # a model it cannot handle fails here
    if keep_files:
        return _run_in_frame(setup, args, defense, algorithm, setup.record.folder / "defense" / defense, started)
    with tempfile.TemporaryDirectory(prefix=f"{defense}-") as scratch:
        result = _run_in_frame(setup, args, defense, algorithm, Path(scratch) / defense, started)
    result.folder = None
    return result


def _run_in_frame(setup, args, defense, algorithm, output, started):
    title = DEFENSES.lookup(defense).title
    with OutputFolder(output) as out:
        logger = setup_logger(out.path, defense)
        run = DefenseRun(setup, out.path, logger, defense)
        logger.info(f"{title} on {setup.record.folder} ({setup.record.model_name}, {args.dataset}) on "
                    f"{setup.device}; options: {vars(args)}")
        logger.info(setup.precision)
        for note in setup.notes:
            logger.info(note)
        if args.eval_limit:
            logger.info(f"--eval_limit {args.eval_limit}: test metrics come from the first {args.eval_limit} "
                        "images of each test set only (a quick check, not comparable with full evaluations)")
        write_index(out.path / "index.txt", setup.clean_indices)
        write_index(out.path / "log" / "index.txt", setup.clean_indices)

        with run.phase("evaluate_before"):
            before = run.evaluate(setup.model)
        run.count_images("evaluate_before", setup.eval_sets.images())
        run.log_metrics("before", before)

        model = algorithm(run)

        with run.phase("evaluate_after"):
            after = run.evaluate(model)
        run.count_images("evaluate_after", setup.eval_sets.images())
        run.log_metrics("after", after)
        run.seconds["total"] = time.perf_counter() - started

        save_defense_result(out.path, setup.record.model_name, setup.record.num_classes, cpu_state_dict(model))
        non_empty = {stem: rows for stem, rows in run.epoch_tables.items() if rows}
        if non_empty:
            list(non_empty.values())[-1][-1].update(after)
        for stem, rows in non_empty.items():
            plot_epochs(write_epoch_csvs(rows, out.path, stem), out.path, stem)
        peak = peak_memory_mib()
        for phase, seconds in run.seconds.items():
            if phase == "total":
                continue
            rate = run.images.get(phase, 0) / seconds if seconds > 0 else 0.0
            logger.info(f"phase {phase}: {seconds:.1f} s" + (f", {rate:.1f} images/s" if rate else ""))
        logger.info(f"peak memory {peak:.0f} MiB")
        summary = {
            "defense": defense, "record": setup.record.name, "model": setup.record.model_name,
            "dataset": args.dataset, "device": str(setup.device), "before": before, "after": after,
            "der": der(before, after), "seconds": run.seconds, "images": run.images, "peak_memory_mib": peak,
            "clean_samples": len(setup.clean_indices), "eval_limit": args.eval_limit, **run.summary,
        }
        write_json(out.path / "summary.json", summary)
        logger.info(summary_line(title, before, after, run.seconds["total"]))
    return DefenseResult(model, before, after, summary, output)
