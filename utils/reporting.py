"""Defense outputs in BackdoorBench's layout: the output folder, the log, per-epoch CSVs with their summaries,
plots, defense_result.pt, DER and the final summary line."""
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from utils.errors import UserError

EPOCH_COLUMNS = ["epoch", "batch", "train_epoch_loss_avg_over_batch", "train_acc", "clean_test_loss_avg_over_batch",
                 "bd_test_loss_avg_over_batch", "test_acc", "test_asr", "test_ra"]
METRICS = ("test_acc", "test_asr", "test_ra")


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _exchange(first, second):
    """Swap two paths in one step where Linux offers it (renameat2 RENAME_EXCHANGE): a kill at any moment leaves
    one of the two results under the final name. Returns False where the system cannot."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange) == 0


class OutputFolder:
    """Writes into a temporary sibling folder (.NAME.partial-PID-*) and moves it into place only when the run
    succeeds, so a failed or interrupted run never leaves a half-written folder nor destroys an earlier one. With
    `replace` a successful run swaps itself with an existing folder (a defense rerun) in one atomic exchange;
    without it an existing folder is an error (attack records are never overwritten). Leftovers of runs that were
    killed (their process is gone) are removed, never those of a live run."""

    def __init__(self, final, replace=True, exists_hint=""):
        self.final = Path(final)
        self.replace = replace
        self.exists_hint = exists_hint
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self._clean_leftovers()
        if not replace and self.final.exists():
            raise UserError(f"{self.final} already exists{exists_hint}")
        self.path = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.partial-{os.getpid()}-", dir=self.final.parent))

    def _clean_leftovers(self):
        """Remove partial folders of dead runs; bring back an earlier result that a kill left aside (the
        .previous-* folder of the two-rename fallback) when nothing stands under the final name."""
        for leftover in self.final.parent.glob(f".{self.final.name}.partial-*"):
            pid = leftover.name.rsplit(".partial-", 1)[1].split("-", 1)[0]
            if not pid.isdigit() or not _pid_alive(int(pid)):
                shutil.rmtree(leftover, ignore_errors=True)
        for previous in sorted(self.final.parent.glob(f".{self.final.name}.previous-*")):
            if not self.final.exists():
                previous.rename(self.final)
            else:
                shutil.rmtree(previous, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, kind, err, trace):
        close_log_handlers(self.path)
        if err is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            return False
        if self.final.exists():
            if not self.replace:
                shutil.rmtree(self.path, ignore_errors=True)
                raise UserError(f"{self.final} appeared while this run worked; its output was discarded")
            if _exchange(self.path, self.final):
                shutil.rmtree(self.path, ignore_errors=True)  # now the earlier result
            else:
                previous = self.final.with_name(f".{self.final.name}.previous-{os.getpid()}")
                self.final.rename(previous)
                self.path.rename(self.final)
                shutil.rmtree(previous, ignore_errors=True)
        else:
            self.path.rename(self.final)
        self.path = self.final
        return False


def setup_logger(folder, name="defense", subfolder="log"):
    """Log to <folder>/<subfolder>/<YYYY_mm_dd_HH_MM_SS>.log (everything) and to the console (INFO and above).
    BackdoorBench's defenses log under log/, its attacks in the record folder itself (subfolder "")."""
    log_dir = Path(folder) / subfolder
    log_dir.mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger(f"{name}.{folder}")
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    formatter = logging.Formatter("%(asctime)s [%(levelname)-8s] %(message)s", "%Y-%m-%d:%H:%M:%S")
    file_handler = logging.FileHandler(log_dir / f"{time.strftime('%Y_%m_%d_%H_%M_%S')}.log")
    file_handler.setFormatter(formatter)
    console = logging.StreamHandler(sys.stdout)
    console.setLevel(logging.INFO)
    console.setFormatter(formatter)
    logger.addHandler(file_handler)
    logger.addHandler(console)
    return logger


def close_log_handlers(folder):
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger) and name.endswith(f".{folder}"):
            for handler in list(logger.handlers):
                handler.close()
                logger.removeHandler(handler)


def write_index(path, indices):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("".join(f"{int(i)}\n" for i in indices))


def read_index(path):
    """Clean-subset indices from a file of one int per line (BackdoorBench's index.txt)."""
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise UserError(f"cannot read index file {path}: {err.strerror}") from None
    try:
        return [int(line) for line in text.split() if line.strip()]
    except ValueError:
        raise UserError(f"index file {path} must hold one integer per line") from None


def epoch_table(rows, columns=EPOCH_COLUMNS):
    """DataFrame with BackdoorBench's per-epoch columns (NaN where a value was not measured)."""
    return pd.DataFrame([{column: row.get(column, math.nan) for column in columns} for row in rows], columns=columns)


def write_epoch_csvs(rows, folder, stem, columns=EPOCH_COLUMNS):
    """<stem>.csv (one row per epoch; an epoch that was not evaluated has empty cells, which pandas reads back as
    NaN) and <stem>_summary.csv (rows last, valid_max, exist_nan_value; "nan_value" as BackdoorBench writes it)."""
    table = epoch_table(rows, columns)
    table.to_csv(Path(folder) / f"{stem}.csv")
    summary = pd.DataFrame([table.iloc[-1], table.max(skipna=True), table.isna().any()],
                           index=["last", "valid_max", "exist_nan_value"])
    summary.to_csv(Path(folder) / f"{stem}_summary.csv", na_rep="nan_value")
    return table


def plot_epochs(table, folder, stem=None):
    """<stem>_loss_metric_plots.png and <stem>_acc_like_metric_plots.png over epochs (no prefix without stem,
    as BackdoorBench names an attack's plots)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    for suffix, columns in (("loss_metric", ["train_epoch_loss_avg_over_batch", "clean_test_loss_avg_over_batch",
                                      "bd_test_loss_avg_over_batch"]),
                            ("acc_like_metric", ["train_acc", "test_acc", "test_asr", "test_ra"])):
        figure, axis = plt.subplots(figsize=(6, 4))
        for column in columns:
            if column not in table:
                continue
            values = table[column]
            if values.notna().any():
                axis.plot(table["epoch"], values, marker="o", label=column)
        axis.set_xlabel("epoch")
        axis.set_title(f"{stem + ': ' if stem else ''}{suffix.replace('_', ' ')}")
        axis.legend(fontsize=7)
        axis.grid(alpha=0.3)
        figure.tight_layout()
        figure.savefig(Path(folder) / f"{stem + '_' if stem else ''}{suffix}_plots.png", dpi=100)
        plt.close(figure)


def der(before, after):
    """Defense effectiveness rating: (max(0, dASR) - max(0, dACC) + 1) / 2."""
    return (max(0.0, before["test_asr"] - after["test_asr"]) - max(0.0, before["test_acc"] - after["test_acc"]) + 1) / 2


def summary_line(defense, before, after, seconds):
    """ACC, ASR, RA before -> after, DER and seconds, in one line."""
    parts = [f"{metric[5:].upper()} {before[metric]:.4f} -> {after[metric]:.4f}" for metric in METRICS]
    return f"{defense}: " + ", ".join(parts) + f", DER {der(before, after):.4f}, {seconds:.1f} s"


def save_defense_result(folder, model_name, num_classes, state_dict, file_name="defense_result.pt"):
    """A model in BackdoorBench's defense_result.pt layout (model_name, num_classes, model: a CPU state dict)."""
    torch.save({"model_name": model_name, "num_classes": num_classes, "model": state_dict}, Path(folder) / file_name)


def write_table(rows, path):
    """A list of dicts as a CSV without index column."""
    pd.DataFrame(rows).to_csv(path, index=False)


def strict_json_values(value):
    """`value` with every NaN or infinite float replaced by None: JSON has no token for them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: strict_json_values(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json_values(item) for item in value]
    return value


def write_json(path, values):
    """Strict JSON (no NaN / Infinity tokens), written aside and renamed, so a reader never sees half a file."""
    path = Path(path)
    text = json.dumps(strict_json_values(values), indent=2, sort_keys=True, allow_nan=False) + "\n"
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    partial.write_text(text)
    partial.replace(path)
