"""Score a benchmark table against a leaderboard: verdicts per cell, agreement count, rank correlation per attack.

The leaderboard is a Markdown file (resource/leaderboard/cifar10.md, or any file of that shape) holding a table whose
first column names attacks and whose other columns name defenses, each cell `ACC / ASR` in percent, and a sentence
"... defended ASR is at most N% ..." that sets the verdict threshold. Every cell found is scored, so a later file
with more attacks or defenses is scored the same way without a code change.
"""
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from utils.errors import UserError

DEFAULT_LEADERBOARD = Path(__file__).resolve().parents[1] / "resource" / "leaderboard" / "cifar10.md"
# leaderboard spellings -> our script names (after lower-casing and dropping everything but letters and digits)
ALIASES = {"badnets": "badnet", "nodefense": "none"}
THRESHOLD_PATTERN = re.compile(r"ASR is at most\s+(\d+(?:\.\d+)?)\s*%")
CELL_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)\s*$")


def canonical(name):
    key = re.sub(r"[^a-z0-9]", "", str(name).lower())
    return ALIASES.get(key, key)


@dataclass
class Leaderboard:
    cells: pd.DataFrame  # columns attack, defense, acc, asr (fractions), our names
    threshold: float  # a cell "removes" when its ASR is at most this (a fraction)
    source: str

    def verdict(self, asr):
        return "removes" if asr <= self.threshold + 1e-12 else "fails"


def read_leaderboard(path=None):
    path = Path(path or DEFAULT_LEADERBOARD)
    try:
        text = path.read_text()
    except OSError as error:
        raise UserError(f"cannot read the leaderboard {path}: {error.strerror or error}") from None
    match = THRESHOLD_PATTERN.search(text)
    if not match:
        raise UserError(f"{path}: no verdict threshold found (a sentence '... defended ASR is at most N% ...')")
    rows = []
    header = None
    for line in text.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if all(re.fullmatch(r":?-+:?", cell) for cell in cells):
            continue
        if header is None:
            header = [canonical(cell) for cell in cells]
            continue
        for defense, cell in zip(header[1:], cells[1:]):
            numbers = CELL_PATTERN.match(cell)
            if numbers:  # the verdict table and other tables have no `ACC / ASR` cells and add nothing
                rows.append({"attack": canonical(cells[0]), "defense": defense,
                             "acc": float(numbers.group(1)) / 100, "asr": float(numbers.group(2)) / 100})
    if not rows:
        raise UserError(f"{path}: no table with 'ACC / ASR' cells found")
    return Leaderboard(pd.DataFrame(rows).drop_duplicates(["attack", "defense"], keep="last"),
                       float(match.group(1)) / 100, str(path))


def spearman(a, b):
    """Spearman's rank correlation (average ranks for ties); nan when either side is constant or too short."""
    ranks_a, ranks_b = pd.Series(a).rank().to_numpy(float), pd.Series(b).rank().to_numpy(float)
    if len(ranks_a) < 2 or np.ptp(ranks_a) == 0 or np.ptp(ranks_b) == 0:
        return math.nan
    return float(np.corrcoef(ranks_a, ranks_b)[0, 1])


def score(summary, leaderboard):
    """summary: one row per (attack, defense) with `asr_mean` and, when several seeds ran, `verdicts` (the set of
    per-seed verdicts). Returns (cells, correlations): the scored cells (ours against theirs) and Spearman's rho of
    defended ASR per attack across the defenses both have (defense `none` excluded)."""
    theirs = leaderboard.cells[leaderboard.cells["defense"] != "none"].rename(
        columns={"acc": "acc_leaderboard", "asr": "asr_leaderboard"})
    merged = theirs.merge(summary, on=["attack", "defense"], how="inner")
    merged = merged[merged["asr_mean"].notna()].copy()
    merged["leaderboard_verdict"] = merged["asr_leaderboard"].map(leaderboard.verdict)
    merged["verdict"] = merged["asr_mean"].map(leaderboard.verdict)
    merged["agrees"] = merged["verdict"] == merged["leaderboard_verdict"]
    merged["flips"] = merged["verdicts"].map(lambda seen: len(seen) > 1) if "verdicts" in merged else False
    correlations = {attack: spearman(group["asr_mean"], group["asr_leaderboard"])
                    for attack, group in merged.groupby("attack", sort=False)}
    return merged, correlations


def score_lines(cells, correlations, leaderboard, title="Agreement with the leaderboard"):
    """The score as Markdown: the count, the per-attack rank correlations, the cells that disagree or flip."""
    if cells.empty:
        return [f"{title}: no cell of {leaderboard.source} is in this table (nothing scored)."]
    agreed = int(cells["agrees"].sum())
    rhos = [rho for rho in correlations.values() if not math.isnan(rho)]
    lines = [f"{title} ({Path(leaderboard.source).name}; a cell removes the backdoor when ASR <= "
             f"{leaderboard.threshold:.0%}): **{agreed} of {len(cells)} verdicts agree**.",
             "Spearman's rho of defended ASR per attack (ours against the leaderboard's, across "
             f"{', '.join(sorted(cells['defense'].unique()))}): " +
             ", ".join(f"{attack} {rho:+.2f}" if not math.isnan(rho) else f"{attack} n/a (ties)"
                       for attack, rho in correlations.items()) +
             (f"; mean {np.mean(rhos):+.2f}." if rhos else ".")]
    for _, row in cells.iterrows():
        notes = []
        if not row["agrees"]:
            notes.append(f"disagrees: here {row['verdict']} (ASR {row['asr_mean']:.3f}), leaderboard "
                         f"{row['leaderboard_verdict']} (ASR {row['asr_leaderboard']:.3f})")
        if row["flips"]:
            notes.append("the verdict flips between seeds")
        if notes:
            lines.append(f"- {row['attack']} x {row['defense']}: " + "; ".join(notes))
    return lines
