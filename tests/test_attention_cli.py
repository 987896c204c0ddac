"""`dreamblend attention` (and `dreamblend generate --attention-maps`) end to end on the tiny model."""

import json

import numpy as np
import pytest
from PIL import Image

from dreamblend_ray.cli import main
from dreamblend_ray.training import layout

from test_generate_cli import subject_root  # noqa: F401 - the tiny fine-tuned subject (steps 2 and 4)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = ["a photo of sks dog", "a sks dog beside a red ball on the grass"]


def _attention(root, out, *argv):
    return main(["--log-level", "WARNING", "attention", "--base", "tiny", "--steps", "4",
                 "--guidance-ckpt", layout.checkpoint_uri(root, "rex", 2),
                 "--edit-ckpt", layout.checkpoint_uri(root, "rex", 4), "--out", str(out), *argv])


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=int)


@pytest.fixture(scope="module")
def guided(subject_root, tmp_path_factory):  # noqa: F811 - the imported fixture
    out = tmp_path_factory.mktemp("attention")
    argv = [a for p in PROMPTS for a in ("--prompt", p)]
    assert _attention(subject_root, out, *argv, "--seed", "3", "--alpha", "2", "--guidance-steps", "3") == 0
    return out


def test_files_words_and_map_shapes(guided):
    summary = json.loads((guided / "settings.json").read_text())
    assert [s["prompt"] for s in summary["samples"]] == PROMPTS
    assert summary["settings"]["attention_maps"] is True
    for index, prompt in enumerate(PROMPTS):
        stem = f"{index:04d}"
        document = json.loads((guided / f"{stem}-attention.json").read_text())
        assert document["words"] == prompt.split() and document["seed"] == 3
        assert document["images"] == {"guidance": f"{stem}-g.png", "edit": f"{stem}-e.png",
                                      "dreamblend": f"{stem}-dreamblend.png"}
        h, w = document["map_size"]
        assert h * w > 1
        for row in ("guidance", "edit", "dreamblend"):
            maps = np.asarray(document["maps"][row])
            assert maps.shape == (len(prompt.split()), h, w) and np.isfinite(maps).all()
            assert Image.open(guided / document["images"][row]).size == (32, 32)
        assert len(document["attention_distance_steps"]) == 3  # the guided window, K = 3


def test_grid_has_three_rows_and_a_column_per_word(guided):
    words = [len(p.split()) for p in PROMPTS]
    short, long = (Image.open(guided / f"{i:04d}-attention.png").size for i in range(2))
    column = (long[0] - short[0]) / (words[1] - words[0])
    assert column > 0 and column == int(column)
    label = short[0] - (1 + words[0]) * column
    assert label == long[0] - (1 + words[1]) * column and 0 <= label < 2 * column
    assert short[1] == long[1] and 0 <= short[1] - 3 * column < column  # three rows under a header


def test_guidance_changes_dreamblend(guided):
    g, e, blend = (_pixels(guided / f"0001-{s}.png") for s in ("g", "e", "dreamblend"))
    assert np.abs(g - blend).max() > 0
    assert np.abs(e - blend).max() > 0  # alpha 2 over 3 of 4 steps moves E's image


def test_generate_writes_the_grid_and_alpha_zero_dreamblend_is_e(subject_root, tmp_path):  # noqa: F811
    """`generate --attention-maps` uses the same writer next to its own images; at alpha 0
    DreamBlend is E unguided (the alpha = 0 property), images and maps alike."""
    rc = main(["--log-level", "WARNING", "generate", "--base", "tiny", "--steps", "4",
               "--checkpoints", subject_root, "--subject-id", "rex", "--prompt", PROMPTS[0], "--alpha", "0",
               "--attention-maps", "--maps-start", "1", "--out", str(tmp_path)])
    assert rc == 0
    (record,) = json.loads((tmp_path / "settings.json").read_text())["images"]
    assert record["attention_grid"] == "0000-attention.png" and (tmp_path / "0000-attention.png").is_file()
    assert record["images"] == {"guidance": "0000-reference.png", "edit": "0000-e.png", "dreamblend": "0000.png"}
    assert np.array_equal(_pixels(tmp_path / "0000-e.png"), _pixels(tmp_path / "0000.png"))
    assert np.abs(_pixels(tmp_path / "0000-reference.png") - _pixels(tmp_path / "0000.png")).max() > 0
    document = json.loads((tmp_path / "0000-attention.json").read_text())
    assert document["words"] == PROMPTS[0].split()
    assert np.array_equal(np.asarray(document["maps"]["edit"]), np.asarray(document["maps"]["dreamblend"]))


@pytest.mark.parametrize("maps", [["--maps-start", "4"], ["--maps-stop", "5"],
                                  ["--maps-start", "2", "--maps-stop", "2"]])
def test_bad_maps_range_exits_2(maps, tmp_path, caplog):
    assert _attention("nowhere", tmp_path, "--prompt", "a dog", *maps) == 2
    assert "maps_st" in caplog.text
