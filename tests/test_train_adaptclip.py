"""AdaptCLIP training with tools/train.py on CPU (``ovdense/mm/adaptclip.py``,
``configs/adaptclip/adaptclip_toy_domain-a.py``): the dataset's samples against the official ``Dataset`` of
gaobb/AdaptCLIP on the same files, the loss falling, exact resume after SIGKILL, two processes, and the
exported head that ``AdaptClip`` and the CLI read. Runs train the toy CLIP's adapters on two toy
categories."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tool_runs import ROOT, kill_after_checkpoint, run, short_run_options, torchrun, train_command

from ovdense.errors import OvdenseError

pytest.importorskip("mmseg.models", reason="needs mmsegmentation 1.2.2: pip install -e '.[mm]'")

CONFIG = ROOT / "configs" / "adaptclip" / "adaptclip_toy_domain-a.py"
ITERS = 4
CATEGORIES = ["circle_plain", "square_striped"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Two toy categories in the MVTec AD layout: 3 normal training images, per category 1 normal and 1 of
    each defect kind in the test split (8 training samples)."""
    from ovdense.data.layouts import write_toy_anomaly

    return write_toy_anomaly(tmp_path_factory.mktemp("toy"), CATEGORIES, 3, 1, seed=4)


def options(world, **overrides) -> list[str]:
    return short_run_options(ITERS, {"train_dataloader.dataset.root": str(world),
                                     "train_dataloader.batch_size": "2"}, overrides)


def test_samples_are_the_official_datasets(world, tmp_path):
    """Image, mask and label of each sample equal the official ``Dataset(mode="train")`` item of the same
    file through the official transforms (``get_transform(128)``); the paired image is the official
    transform of one of the category's normal training images; the pairing follows (seed, draw)."""
    import json

    import official_adaptclip as oa

    from ovdense.data.anomaly_datasets import iter_mvtec
    from ovdense.mm.adaptclip import AnomalyPairDataset

    official = oa.import_adaptclip(tmp_path / "official")
    info = {"train": {}, "test": {}}
    for category in CATEGORIES:
        for split in ("train", "test"):
            info[split][category] = [dict(img_path=str(s.image.relative_to(world)),
                                          mask_path=str(s.mask.relative_to(world)) if s.mask else "",
                                          cls_name=category, specie_name=s.defect, anomaly=s.label)
                                     for s in iter_mvtec(world, category, split)]
    (world / "meta.json").write_text(json.dumps(info))
    preprocess, target = official.test.get_transform(image_size=128)
    theirs = official.dataset.Dataset(root=str(world), transform=preprocess, target_transform=target,
                                      dataset_name="mvtec", k_shots=1, save_dir=str(tmp_path), mode="train")
    mine = AnomalyPairDataset(str(world), image_size=128)
    assert len(mine) == len(theirs) == 8
    mean = torch.tensor(preprocess.transforms[-1].mean).view(3, 1, 1)
    std = torch.tensor(preprocess.transforms[-1].std).view(3, 1, 1)
    normals = {c: [preprocess(Image.open(s.image)) for s in iter_mvtec(world, c, "train")]
               for c in CATEGORIES}
    for index in range(len(mine)):
        sample, item = mine[(index, 7, 3)], theirs[index]
        assert torch.allclose((sample["inputs"] - mean) / std, item["img"], atol=1e-6)
        mask = item["img_mask"][0]
        assert torch.equal(sample["data_samples"]["mask"], (mask > 0.5).float())
        assert sample["data_samples"]["label"] == item["anomaly"]
        prompt = (sample["data_samples"]["prompts"][0] - mean) / std
        assert any(torch.allclose(prompt, n, atol=1e-6) for n in normals[item["cls_name"]])
    assert mine[(6, 7, 3)]["data_samples"]["mask"].sum() > 0
    draws = {int(mine[(0, d, 3)]["data_samples"]["prompts"].sum() * 1000) for d in range(12)}
    assert len(draws) > 1  # the pairing changes with the draw, and is the same for the same one:
    assert torch.equal(mine[(0, 5, 3)]["data_samples"]["prompts"], mine[(0, 5, 3)]["data_samples"]["prompts"])


def test_bad_datasets_are_refused_in_one_line(world, tmp_path):
    from ovdense.mm.adaptclip import AnomalyPairDataset

    with pytest.raises(OvdenseError, match="layout must be one of"):
        AnomalyPairDataset(str(world), layout="coco")
    with pytest.raises(OvdenseError, match="are not in"):
        AnomalyPairDataset(str(world), categories=["bottle"])
    with pytest.raises(OvdenseError, match="not found"):
        AnomalyPairDataset(str(tmp_path / "nowhere"))
    lonely = tmp_path / "lonely"
    (lonely / "bottle" / "test" / "good").mkdir(parents=True)
    (lonely / "bottle" / "train" / "good").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(lonely / "bottle" / "test" / "good" / "000.png")
    with pytest.raises(OvdenseError, match="no normal training images"):
        AnomalyPairDataset(str(lonely))


def test_the_loss_falls_on_a_repeated_batch(world):
    from mmengine.dataset import pseudo_collate

    from ovdense.mm.adaptclip import AnomalyPairDataset, OvdenseAdaptClip

    torch.manual_seed(0)
    model = OvdenseAdaptClip(dict(name="toy"), dict(image_size=128, sigma=1.0)).train()
    names = [n for n, _ in model.named_parameters()]
    assert names and all(n.startswith("head.") for n in names)
    dataset = AnomalyPairDataset(str(world), image_size=128)
    batch = pseudo_collate([dataset[(i, i, 0)] for i in range(4)])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.5, 0.999))
    losses = []
    for _ in range(12):
        out = model(**batch, mode="loss")
        loss = out["loss_local"] + out["loss_global"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    with pytest.raises(OvdenseError, match="only trains"):
        model(**batch, mode="predict")


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory):
    """An uninterrupted run of ITERS iterations, checkpoints every 2."""
    work = tmp_path_factory.mktemp("reference")
    run(train_command(CONFIG, work, options(world)), cwd=work, check=True)
    return work


def _state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_killed_and_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(world, reference, tmp_path):
    work = tmp_path / "killed"
    opts = options(world)
    kill_after_checkpoint(train_command(CONFIG, work, opts), tmp_path, work / "iter_2.pth", 240)
    assert not (work / f"iter_{ITERS}.pth").exists(), "killed too late: the run had finished"
    run(train_command(CONFIG, work, opts, "--resume"), cwd=tmp_path, check=True)
    resumed, straight = _state(work / f"iter_{ITERS}.pth"), _state(reference / f"iter_{ITERS}.pth")
    assert resumed.keys() == straight.keys()
    start = _state(reference / "iter_2.pth")
    assert any(not torch.equal(straight[k], start[k]) for k in straight)  # it trained in between
    for key, value in straight.items():
        assert torch.equal(resumed[key], value), key


def test_two_processes_train_and_export(world, tmp_path):
    """torchrun, 2 processes × 2 images against 1 process × 4 images: the same draws and the gradients
    averaged over the processes. Batch-norm statistics are each process's own (as for any BN head under
    DDP without sync_bn, which needs a GPU), so only the textual contexts, which no batch norm reaches,
    train to the one-process weights (to rounding); the run exports a head."""
    pytest.importorskip("torch.distributed.run")
    single, double = tmp_path / "one", tmp_path / "two"
    run(train_command(CONFIG, single, options(world, **{"train_dataloader.batch_size": 4})), cwd=tmp_path,
        check=True)
    run(torchrun(str(ROOT / "tools" / "train.py"), str(CONFIG), "--work-dir", str(double),
                 "--cfg-options", *options(world)), cwd=tmp_path, check=True)
    one, two = _state(single / f"iter_{ITERS}.pth"), _state(double / f"iter_{ITERS}.pth")
    start = _state(single / "iter_2.pth")
    contexts = [k for k in one if k.endswith(("ctx_normal", "ctx_anomalous"))]
    moved = max(float((one[k] - start[k]).abs().max()) for k in contexts)
    worst = max(float((one[k] - two[k]).abs().max()) for k in contexts)
    print(f"textual contexts, 2 processes vs 1 after {ITERS} iterations: {worst:.3g} (moved {moved:.3g})")
    assert moved > 1e-4 and worst < 1e-5
    assert (double / "adaptclip_head.safetensors").is_file()
    lone = options(world, **{"train_dataloader.batch_size": 1})
    result = run(train_command(CONFIG, tmp_path / "lone", lone), cwd=tmp_path)
    assert result.returncode != 0 and "at least 2" in result.stdout + result.stderr


def test_the_exported_head_is_the_trained_adapters_and_loads(world, reference):
    from ovdense import create_backbone
    from ovdense.anomaly.adaptclip import AdaptClip, load_head

    backbone = create_backbone("toy")
    head = load_head(reference / "adaptclip_head.safetensors", backbone)
    trained = _state(reference / f"iter_{ITERS}.pth")
    for key, value in head.state_dict().items():
        assert torch.equal(value, trained[f"head.{key}"]), key
    assert head.config.image_size == 128 and head.config.sigma == 1.0
    rgb = np.asarray(Image.open(next((world / "circle_plain" / "test" / "holed").iterdir())).convert("RGB"))
    (result,) = AdaptClip(backbone, head_checkpoint=reference / "adaptclip_head.safetensors").predict(rgb)
    assert result.map.shape == rgb.shape[:2] and 0 <= result.score <= 1
    assert (reference / "loss.png").is_file()
