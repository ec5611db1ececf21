"""Scoring a benchmark against a leaderboard file (utils/leaderboard.py) and the seed summary (utils/benchmark.py)."""
import math

import pandas as pd
import pytest

from fakes import fake_record
from utils.benchmark import aggregate, collect_seeds, write_benchmark
from utils.catalog import ATTACKS
from utils.errors import UserError
from utils.leaderboard import DEFAULT_LEADERBOARD, canonical, read_leaderboard, score, spearman

LEADERBOARD = """# a leaderboard
A cell's verdict is **removes** when the defended ASR is at most 20%, otherwise **fails**.

| attack | no defense | FT | CLP |
|---|---|---|---|
| BadNets | 91.0 / 95.0 | 90.0 / 1.5 | 90.0 / 77.5 |
| Input-aware | 90.0 / 98.0 | 93.0 / 1.7 | 90.0 / 2.2 |

| attack | FT | CLP |
|---|---|---|
| BadNets | removes | fails |
"""


def test_the_shipped_leaderboard_holds_the_18_cells_and_their_verdicts():
    board = read_leaderboard()
    cells = board.cells[board.cells["defense"] != "none"]
    assert len(cells) == 18 and board.threshold == pytest.approx(0.20)
    assert set(cells["attack"]) == set(ATTACKS)  # the leaderboard names map to our registered attacks
    verdicts = {(row.attack, row.defense): board.verdict(row.asr) for row in cells.itertuples()}
    assert [d for (a, d), v in verdicts.items() if v == "fails"] == ["clp", "ft", "clp", "clp", "clp"]
    assert verdicts["wanet", "ft"] == "removes"  # 17.10%: under the threshold
    sig_anp = cells[(cells["attack"] == "sig") & (cells["defense"] == "anp")].iloc[0]
    assert sig_anp["acc"] == pytest.approx(0.7797) and sig_anp["asr"] == pytest.approx(0.0001)


def test_the_shipped_copy_matches_the_specification_when_it_is_there():
    from conftest import SHARED
    spec = SHARED / "spec" / "leaderboard.md"
    if not spec.is_file():
        pytest.skip("the specification folder is not beside the repository")
    ours, theirs = read_leaderboard(DEFAULT_LEADERBOARD), read_leaderboard(spec)
    pd.testing.assert_frame_equal(ours.cells.reset_index(drop=True), theirs.cells.reset_index(drop=True))
    assert ours.threshold == theirs.threshold


def test_names_threshold_and_bad_files(tmp_path):
    assert [canonical(n) for n in ("BadNets", "Input-aware", "no defense", "WaNet")] == \
        ["badnet", "inputaware", "none", "wanet"]
    path = tmp_path / "board.md"
    path.write_text(LEADERBOARD.replace("at most 20%", "at most 5%"))
    board = read_leaderboard(path)
    assert board.threshold == pytest.approx(0.05) and len(board.cells) == 6  # the verdict table adds nothing
    path.write_text("| a | b |\n|---|---|\n| x | 1 / 2 |\n")
    with pytest.raises(UserError, match="no verdict threshold"):
        read_leaderboard(path)
    path.write_text("defended ASR is at most 20% here\n")
    with pytest.raises(UserError, match="no table"):
        read_leaderboard(path)
    with pytest.raises(UserError, match="cannot read"):
        read_leaderboard(tmp_path / "absent.md")


def test_spearman_with_ties_and_constants():
    assert spearman([0.1, 0.5, 0.9], [0.0, 0.2, 0.8]) == pytest.approx(1.0)
    assert spearman([0.9, 0.5, 0.1], [0.0, 0.2, 0.8]) == pytest.approx(-1.0)
    assert spearman([0.0, 0.0, 0.9], [0.01, 0.02, 0.9]) == pytest.approx(math.sqrt(3) / 2)
    assert math.isnan(spearman([0.1, 0.1, 0.1], [0.0, 0.2, 0.8]))


def test_seeds_are_aggregated_scored_and_flips_marked(tmp_path):
    path = tmp_path / "board.md"
    path.write_text(LEADERBOARD)
    board = read_leaderboard(path)
    metrics = {"test_acc": 0.85, "test_asr": 0.96, "test_ra": 0.03}
    records = {
        0: {"badnet": fake_record(tmp_path, "badnet_proxy", metrics, {"ft": (0.84, 0.10, 0.8, 0.9, 60.0),
                                                                        "clp": (0.85, 0.90, 0.1, 0.5, 5.0),
                                                                        "ulrl": (0.84, 0.0, 0.9, 0.98, 9.0)}),
            "inputaware": fake_record(tmp_path, "inputaware_proxy", metrics, {"ft": (0.84, 0.05, 0.8, 0.9, 60.0),
                                                                                "clp": (0.85, 0.50, 0.4, 0.7, 5.0)})},
        1: {"badnet": fake_record(tmp_path, "badnet_proxy_seed1", metrics, {"ft": (0.82, 0.30, 0.6, 0.8, 70.0),
                                                                              "clp": (0.85, 0.70, 0.2, 0.6, 6.0)}),
            "inputaware": fake_record(tmp_path, "inputaware_proxy_seed1", metrics)},
    }
    runs = collect_seeds(records, ["none", "ft", "clp", "ulrl"])
    assert len(runs) == 16 and sorted(runs["seed"].unique()) == [0, 1]
    summary = aggregate(runs, board.verdict)
    cell = summary[(summary["attack"] == "badnet") & (summary["defense"] == "ft")].iloc[0]
    assert cell["seeds"] == 2 and cell["asr_mean"] == pytest.approx(0.20) and cell["asr_std"] == pytest.approx(0.10)
    assert cell["verdicts"] == {"removes", "fails"}
    missing = summary[(summary["attack"] == "inputaware") & (summary["defense"] == "ulrl")].iloc[0]
    assert missing["seeds"] == 0 and math.isnan(missing["asr_mean"])
    cells, correlations = score(summary, board)
    assert len(cells) == 4  # ulrl is not on the leaderboard: reported, not scored
    agrees = {(row.attack, row.defense): row.agrees for row in cells.itertuples()}
    assert agrees == {("badnet", "ft"): True, ("badnet", "clp"): True, ("inputaware", "ft"): True,
                      ("inputaware", "clp"): False}
    assert correlations["badnet"] == pytest.approx(1.0) and correlations["inputaware"] == pytest.approx(1.0)
    text = write_benchmark(runs, summary, board, tmp_path / "out", "Scale: test")
    assert "**3 of 4 verdicts agree**" in text and "badnet +1.00, inputaware +1.00; mean +1.00" in text
    assert "- badnet x ft: the verdict flips between seeds" in text
    assert "- inputaware x clp: disagrees: here fails (ASR 0.500), leaderboard removes (ASR 0.022)" in text
    assert "| badnet | ft (verdict flips) | 0.830 ± 0.010 | 0.200 ± 0.100 |" in text
    assert "| badnet | ulrl | 0.840 | 0.000 | 0.900 | 0.980 | 9.0 | 1 |" in text
    assert (tmp_path / "out" / "asr_heatmap.png").stat().st_size > 1000
    assert pd.read_csv(tmp_path / "out" / "leaderboard_score.csv")["agrees"].tolist().count(True) == 3
