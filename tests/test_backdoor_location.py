"""sh/backdoor_location.py: the analysis that tells head-borne from feature-borne backdoors."""
import json

import pytest
import torch

from conftest import REPO_ROOT, require_cifar10
from fakes import small_data, tiny
from helpers import load_script

location = load_script("sh/backdoor_location.py")


def test_head_inputs_are_what_the_head_receives_and_the_mode_is_restored():
    model = tiny().train()
    data = small_data(10)
    features = location.head_inputs(model, model.head, data, batch_size=4)
    assert features.shape == (10, 6)
    assert model.training  # eval only for the capture
    model.eval()
    with torch.no_grad():
        x = next(data.batches(10))[0]
        expected = model.plain(torch.relu(model.bn_fc(model.fc(torch.relu(model.bn(model.conv(x))).mean((2, 3))))))
    assert torch.allclose(features, expected, atol=1e-5)


def test_a_head_trained_on_separable_features_fits_them():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(3).repeat(20)
    features = torch.randn(60, 5, generator=generator) * 0.1
    features[torch.arange(60), labels] += 2.0  # class k lights up dimension k
    weight, bias, loss = location.train_head(features, labels, 3, steps=100, lr=0.1, seed=0)
    assert ((features @ weight.T + bias).argmax(1) == labels).all()
    assert loss < 0.1


@pytest.mark.slow  # PreAct-ResNet18 on a real record: CI's slow set
def test_a_shared_record_gets_its_retrained_head_and_similarities(shared_record):
    require_cifar10()
    folder = shared_record("badnet_0_1")
    assert location.main(["--result_file", "badnet_0_1", "--record_dir", str(folder.parent), "--dataset_path",
                          str(REPO_ROOT / "data"), "--ratio", "0.004", "--steps", "20", "--eval_limit", "50"]) == 0
    result = json.loads((folder / "analysis" / "backdoor_location.json").read_text())
    assert result["clean_samples"] == 200
    assert 0.0 <= result["retrained_head"]["test_asr"] <= 1.0
    cosines = result["poisoned_mean_cosine_to_class_means"]["backdoored"]
    assert len(cosines) == 10 and all(-1.0 <= c <= 1.0 for c in cosines)
