"""The attack x defense table: collected from the records' summary.json files, written as CSV, Markdown and a figure.

Row per (attack, defense): ACC, ASR, RA (fractions), DER and the defense's seconds. The row of defense `none` is
the backdoored model itself (the attack's own evaluation). A pair without a result is kept with status `missing`.
Over several attack seeds, `aggregate` gives each cell's mean and spread, and the benchmark's outputs add a heat-map
of ASR after defense and the score against a leaderboard (utils/leaderboard.py).
"""
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

METRIC_COLUMNS = ["acc", "asr", "ra", "der", "seconds"]
COLUMNS = ["attack", "defense", "record", *METRIC_COLUMNS, "status"]
# for marking the best defense of an attack: higher is better, except ASR and seconds
LOWER_IS_BETTER = {"asr", "seconds"}


def _read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def attack_metrics(record_folder):
    """The backdoored model's test metrics (and `seconds`, the attack's run time): our attack's summary.json, else
    BackdoorBench's attack_df_summary.csv."""
    summary = _read_json(Path(record_folder) / "summary.json")
    if summary and "metrics" in summary:
        return {**summary["metrics"], "seconds": summary.get("seconds", math.nan)}
    table = Path(record_folder) / "attack_df_summary.csv"
    if table.is_file():
        last = pd.read_csv(table, index_col=0).loc["last"]
        return {key: float(last[key]) for key in ("test_acc", "test_asr", "test_ra") if key in last}
    return None


def result_row(attack, defense, record_folder):
    """One table row from record_folder (the attack's record) and its defense/<defense>/summary.json."""
    row = {"attack": attack, "defense": defense, "record": Path(record_folder).name,
           **{column: math.nan for column in METRIC_COLUMNS}, "status": "missing"}
    if defense == "none":
        metrics = attack_metrics(record_folder)
        if metrics:
            row.update(acc=metrics.get("test_acc", math.nan), asr=metrics.get("test_asr", math.nan),
                       ra=metrics.get("test_ra", math.nan), seconds=metrics.get("seconds", math.nan), status="ok")
        return row
    summary = _read_json(Path(record_folder) / "defense" / defense / "summary.json")
    if summary:
        after = summary["after"]
        row.update(acc=after["test_acc"], asr=after["test_asr"], ra=after["test_ra"], der=summary.get("der"),
                   seconds=summary.get("seconds", {}).get("total", math.nan), status="ok")
        if summary.get("eval_limit"):
            row["status"] = f"ok (eval_limit {summary['eval_limit']})"
    return row


def collect(records, defenses):
    """records: {attack: record folder}; the table as a DataFrame in the order given."""
    rows = [result_row(attack, defense, folder) for attack, folder in records.items() for defense in defenses]
    return pd.DataFrame(rows, columns=COLUMNS)


def best_marks(table):
    """{(row index, column)} of the best value per attack and metric among the defenses (not `none`)."""
    marks = set()
    # a run with --eval_limit measured a few test images only: shown, never compared
    defended = table[(table["defense"] != "none") & (table["status"] == "ok")]
    for _, group in defended.groupby("attack", sort=False):
        for column in METRIC_COLUMNS:
            values = group[column].dropna()
            if values.empty:
                continue
            best = values.min() if column in LOWER_IS_BETTER else values.max()
            marks.update((index, column) for index in values.index[values == best])
    return marks


def _cell(value, column, bold):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    text = f"{value:.1f}" if column == "seconds" else f"{value:.4f}"
    return f"**{text}**" if bold else text


def markdown(table, title="", first_column="attack"):
    """The table in Markdown, best value per attack (among defenses) in bold; `first_column` heads the column of
    the table's `attack` key (the batch runner's rows are records)."""
    marks = best_marks(table)
    header = [first_column, "defense", "ACC", "ASR", "RA", "DER", "seconds"]
    lines = [f"{title}\n" if title else "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for index, row in table.iterrows():
        cells = [row["attack"], row["defense"] + ("" if row["status"] == "ok" else f" ({row['status']})")]
        cells += [_cell(row[column], column, (index, column) in marks) for column in METRIC_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"\nBold: the best defense per {first_column} (highest ACC, RA, DER; lowest ASR, seconds) among "
                 "full-test-set runs (a row marked eval_limit is never compared). `none` is the backdoored model (its "
                 "seconds: the attack's run). DER = (max(0, dASR) - max(0, dACC) + 1) / 2.")
    return "\n".join(line for line in lines if line is not None) + "\n"


def plot(table, path):
    """ASR and ACC per attack (groups) and defense (bars)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    attacks = list(dict.fromkeys(table["attack"]))
    defenses = list(dict.fromkeys(table["defense"]))
    width = 0.8 / max(len(defenses), 1)
    figure, axes = plt.subplots(2, 1, figsize=(max(6, 1.3 * len(attacks) * max(1, len(defenses) / 4)), 7),
                                sharex=True)
    for axis, column, label in ((axes[0], "asr", "ASR (lower is better)"), (axes[1], "acc", "clean ACC")):
        for number, defense in enumerate(defenses):
            values = [table[(table["attack"] == a) & (table["defense"] == defense)][column].iloc[0] for a in attacks]
            axis.bar([i + (number - (len(defenses) - 1) / 2) * width for i in range(len(attacks))],
                     [0 if math.isnan(v) else v for v in values], width, label=defense)
        axis.set_ylabel(label)
        axis.set_ylim(0, 1)
        axis.grid(axis="y", alpha=0.3)
    axes[1].set_xticks(range(len(attacks)), attacks)
    axes[0].legend(ncol=min(len(defenses), 8), fontsize=7, loc="upper center", bbox_to_anchor=(0.5, 1.25))
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_outputs(table, folder, title="", first_column="attack"):
    """summary.csv, summary.md and summary.png into folder; returns the Markdown."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    table.to_csv(folder / "summary.csv", index=False)
    text = markdown(table, title, first_column)
    (folder / "summary.md").write_text(text)
    plot(table, folder / "summary.png")
    return text


def collect_seeds(records, defenses):
    """records: {seed: {attack: record folder}}; the runs of every seed, one table with a `seed` column."""
    tables = [collect(by_attack, defenses).assign(seed=seed) for seed, by_attack in records.items()]
    return pd.concat(tables, ignore_index=True)


def aggregate(runs, verdict):
    """Per (attack, defense) over the seeds with a full-test-set result: mean and standard deviation of each metric,
    the number of seeds, and the set of per-seed verdicts (`verdict`: ASR -> "removes" or "fails")."""
    done = runs[runs["status"] == "ok"]
    rows = []
    for (attack, defense), group in runs.groupby(["attack", "defense"], sort=False):
        ok = done[(done["attack"] == attack) & (done["defense"] == defense)]
        row = {"attack": attack, "defense": defense, "seeds": len(ok)}
        for column in METRIC_COLUMNS:
            values = ok[column].dropna()
            row[f"{column}_mean"] = values.mean() if len(values) else math.nan
            row[f"{column}_std"] = values.std(ddof=0) if len(values) > 1 else math.nan
        row["verdicts"] = frozenset(verdict(asr) for asr in ok["asr"].dropna())
        rows.append(row)
    return pd.DataFrame(rows)


def _mean_spread(row, column):
    mean, spread = row[f"{column}_mean"], row[f"{column}_std"]
    if math.isnan(mean):
        return "-"
    digits = 1 if column == "seconds" else 3
    return f"{mean:.{digits}f}" + ("" if math.isnan(spread) else f" ± {spread:.{digits}f}")


def summary_markdown(summary, title=""):
    """The aggregated table: mean ± standard deviation over seeds (population), the seed count, flipping verdicts."""
    header = ["attack", "defense", "ACC", "ASR", "RA", "DER", "seconds", "seeds"]
    lines = [f"{title}\n" if title else "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, row in summary.iterrows():
        flip = " (verdict flips)" if len(row["verdicts"]) > 1 else ""
        lines.append("| " + " | ".join([row["attack"], row["defense"] + flip]
                                        + [_mean_spread(row, column) for column in METRIC_COLUMNS]
                                        + [str(row["seeds"])]) + " |")
    lines.append("\nMean ± standard deviation over the attack seeds that finished (seeds column); `none` is the "
                 "backdoored model (its seconds: the attack's run). DER = (max(0, dASR) - max(0, dACC) + 1) / 2.")
    return "\n".join(line for line in lines if line is not None) + "\n"


def heatmap(summary, path, title="", disagreeing=()):
    """ASR after defense, attack (rows) x defense (columns), mean over seeds printed in each cell; cells in
    `disagreeing` ({(attack, defense)}: the verdict differs from the leaderboard's) are framed in blue."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    attacks = list(dict.fromkeys(summary["attack"]))
    defenses = list(dict.fromkeys(summary["defense"]))
    grid = np.full((len(attacks), len(defenses)), np.nan)
    for _, row in summary.iterrows():
        grid[attacks.index(row["attack"]), defenses.index(row["defense"])] = row["asr_mean"]
    figure, axis = plt.subplots(figsize=(1.0 + 0.9 * len(defenses), 1.0 + 0.55 * len(attacks)))
    image = axis.imshow(np.ma.masked_invalid(grid), cmap="Reds", vmin=0, vmax=1, aspect="auto")
    for i, attack in enumerate(attacks):
        for j, defense in enumerate(defenses):
            value = grid[i, j]
            axis.text(j, i, "-" if np.isnan(value) else f"{value:.2f}", ha="center", va="center", fontsize=8,
                      color="white" if not np.isnan(value) and value > 0.6 else "black")
            if (attack, defense) in disagreeing:
                axis.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="tab:blue", lw=2.5))
    axis.set_xticks(range(len(defenses)), defenses, rotation=30, ha="right")
    axis.set_yticks(range(len(attacks)), attacks)
    axis.set_title(title or "ASR after defense", fontsize=9)
    figure.colorbar(image, ax=axis, fraction=0.04, label="ASR")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_benchmark(runs, summary, leaderboard, folder, title=""):
    """The benchmark's outputs in folder: runs.csv (one row per seed), summary.csv and summary.md (mean ± spread,
    the leaderboard score), asr_heatmap.png; returns the Markdown."""
    from utils.leaderboard import score, score_lines
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    runs.to_csv(folder / "runs.csv", index=False)
    cells, correlations = score(summary, leaderboard)
    table = summary.assign(verdicts=summary["verdicts"].map(lambda seen: " ".join(sorted(seen))))
    table.to_csv(folder / "summary.csv", index=False)
    cells.drop(columns=["verdicts"], errors="ignore").to_csv(folder / "leaderboard_score.csv", index=False)
    disagreeing = {(row.attack, row.defense) for row in cells.itertuples() if not row.agrees}
    heatmap(summary[summary["defense"] != "none"], folder / "asr_heatmap.png",
            "ASR after defense (mean over seeds)\nblue frame: verdict differs from the leaderboard", disagreeing)
    text = summary_markdown(summary, title) + "\n" + "\n".join(score_lines(cells, correlations, leaderboard)) + "\n"
    (folder / "summary.md").write_text(text)
    return text
