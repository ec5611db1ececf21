"""sh/sensitivity.py: one option varied at a time around a config, on a tiny synthetic record, in process."""
import pandas as pd
import pytest

from helpers import load_script
from utils.errors import UserError
from utils.synthetic import write_synthetic_cifar10, write_tiny_record

sensitivity = load_script("sh/sensitivity.py")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("sensitivity")
    write_tiny_record(root / "records", "tiny", write_synthetic_cifar10(root / "data" / "cifar10"))
    return root


def test_rows_vary_one_option_each_and_skip_the_configs_own_value(world, capsys):
    common = ["--set", "dataset=cifar10", f"dataset_path={world / 'data'}", "device=cpu", "ratio=0.5",
              "unlearning_epochs=1", "relearn_epochs=1", "eval_limit=20"]
    code = sensitivity.main(["--result_file", "tiny", "--record_dir", str(world / "records"),
                             "--vary", "relearn_alpha=3,2", "prune_shares=0.05", *common])
    assert code == 0
    table = pd.read_csv(world / "records" / "tiny" / "analysis" / "sensitivity_ulrl.csv")
    assert list(table["run"]) == ["config", "relearn_alpha=2", "prune_shares=0.05"]  # 3 is the config's
    assert table["acc"].between(0, 1).all() and table["asr"].between(0, 1).all()
    text = (world / "records" / "tiny" / "analysis" / "sensitivity_ulrl.md").read_text()
    assert text.startswith("Analysis (reads the test sets (first 20 test images of each set))")
    assert "| relearn_alpha=2 |" in text and text in capsys.readouterr().out
    assert not (world / "records" / "tiny" / "defense").exists()  # nothing written under the record's defense/


def test_unknown_option_and_bad_syntax_are_clear_errors(world):
    with pytest.raises(UserError, match="ulrl has no option --nosuch"):
        sensitivity.main(["--result_file", "tiny", "--record_dir", str(world / "records"), "--vary", "nosuch=1"])
    with pytest.raises(UserError, match="expected KEY=VALUE"):
        sensitivity.main(["--result_file", "tiny", "--record_dir", str(world / "records"), "--vary", "ratio"])
