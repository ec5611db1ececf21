"""defense_api.py, the Python front for notebooks: a defense on a record or on a user's own pieces, the defended
model and metrics returned, nothing written unless asked."""
import pytest
import torch

import defense_api
from own_model_pieces import write_own_model_pieces
from utils.errors import UserError


@pytest.fixture(scope="module")
def pieces(tmp_path_factory):
    return write_own_model_pieces(tmp_path_factory.mktemp("api"))


def own_pieces(pieces, model="view_net", weights="view.pth"):
    return dict(model=f"{pieces / 'tiny_nets.py'}:{model}", weights=str(pieces / weights), mean=[0.5], std=[0.25],
                clean_data=str(pieces / "images"), target=0)


def snapshot(folder):
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


def test_own_model_straight_into_a_defense_writes_nothing(pieces):
    before_files = snapshot(pieces)
    result = defense_api.defend_own_model("ft", **own_pieces(pieces), trigger="badnet",
                                          options={"epochs": 2, "ratio": 0.5, "device": "cpu", "progress": False})
    assert snapshot(pieces) == before_files and result.folder is None
    assert isinstance(result.model, torch.nn.Module) and result.summary["defense"] == "ft"
    assert set(result.before) >= {"test_acc", "test_asr", "test_ra"} and result.summary["clean_samples"] == 18
    original = torch.load(pieces / "view.pth", weights_only=True)
    assert not torch.equal(result.model.state_dict()["fc.weight"].cpu(), original["fc.weight"])


def test_defend_a_record_keeps_its_outputs_only_with_save(pieces):
    folder, spec = defense_api.make_record(pieces / "record" / "api", **own_pieces(pieces), trigger_name="sig",
                                           log=lambda _line: None)
    options = {"epochs": 1, "ratio": 0.5, "device": "cpu"}
    result = defense_api.defend("ft", folder, model=spec, options=options)
    assert result.folder is None and not (folder / "defense").exists()
    assert defense_api.load_record(folder).model_name == spec
    saved = defense_api.defend("ft", folder, model=spec, options=options, save=True)
    assert saved.folder == folder / "defense" / "ft" and (saved.folder / "summary.json").is_file()


def test_bad_options_are_user_errors(pieces):
    with pytest.raises(UserError, match="--epochs"):
        defense_api.defend_own_model("ft", **own_pieces(pieces), trigger="badnet", options={"epochs": -1, "device": "cpu"})
    with pytest.raises(UserError, match="unknown defense"):
        defense_api.defend("nosuch", "anything")
