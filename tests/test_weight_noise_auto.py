"""`--weight-noise auto` (the default of noisegrad and fusiongrad) is calibrated on each image alone: an image's
map is the same bytes whether it is explained alone or inside a folder of other images (issue 16, case 7: the
rocket's s was 0.0189 alone, 0.0166 in a folder of 3 and 0.00696 in the folder of 6 when s was calibrated on
the run's first 16 images)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from saliency_cli.cli.app import main


def _explain(inputs: Path, out: Path, checkpoint: Path) -> list[dict]:
    with pytest.raises(SystemExit) as exit_info:
        main(["explain", str(inputs), "-o", str(out), "-m", "test_resnet", "--checkpoint", str(checkpoint),
              "--input-size", "32", "--method", "noisegrad", "--models", "2", "--seed", "3", "--device", "cpu",
              "-q"])
    assert exit_info.value.code == 0
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def test_an_image_gets_the_same_auto_map_alone_and_in_a_folder(tmp_path):
    torch.manual_seed(0)
    checkpoint = tmp_path / "tiny.safetensors"
    save_file(timm.create_model("test_resnet", pretrained=False).eval().state_dict(), str(checkpoint))
    rng = np.random.default_rng(2)  # here one s for the folder would be 0.0755, for d alone 0.0534 (old rule)
    alone, folder = tmp_path / "alone", tmp_path / "folder"
    alone.mkdir()
    folder.mkdir()
    for name in ("a.png", "b.png", "c.png", "d.png"):  # d sorts last: not among the first images of the folder
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / name)
    (alone / "d.png").write_bytes((folder / "d.png").read_bytes())

    one = _explain(alone, tmp_path / "out_alone", checkpoint)
    many = _explain(folder, tmp_path / "out_folder", checkpoint)
    assert len(one) == 1 and len(many) == 4 and all(r["status"] == "ok" for r in one + many)
    d = next(r for r in many if r["key"] == "d.png")
    assert (tmp_path / "out_alone" / one[0]["outputs"]["npy"]).read_bytes() == \
        (tmp_path / "out_folder" / d["outputs"]["npy"]).read_bytes()
    # the s used is recorded per image, said to be calibrated, and the same alone and in the folder
    for rec in one + many:
        assert rec["params"]["weight_noise_auto"] is True and rec["params"]["weight_noise"] > 0
    assert one[0]["params"]["weight_noise"] == d["params"]["weight_noise"]
    # the images do need different noise: one s for the whole folder would have changed some image's map
    assert len({r["params"]["weight_noise"] for r in many}) > 1
    # and the per-image values are one setting of one method (one column of evaluate/report, not four)
    from saliency_cli.runfolder.folder import assign_labels, read_run

    run = read_run(tmp_path / "out_folder")
    assign_labels([run])
    assert [r.label for r in run.rows] == ["noisegrad"] * 4
