"""Datasets: ODE pairs checked against the recipe's geometry, prompt files, images (cover + centre crop), collate."""
import numpy as np
import pytest
import torch
from PIL import Image

from tests.test_lmdb import TIMESTEPS, tiny_geometry, write_pairs
from utils.datasets import ImageTextDataset, OdeLmdbDataset, TextPromptDataset, collate, load_image
from utils.errors import UserError
from utils.lmdb_store import make_header, scan_pair_folder, write_ode_lmdb

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message and message
    return message


@pytest.fixture
def ode_lmdb(tmp_path):
    """A two-pair LMDB of the tiny recipe's geometry, and the float16 latents written (in row order)."""
    geometry = tiny_geometry()
    latents = write_pairs(tmp_path / "pairs", {0: "b second", 1: "a first"}, geometry)
    pairs = sorted(scan_pair_folder(tmp_path / "pairs"), key=lambda info: info.prompt)
    header = make_header(count=2, shape=[len(TIMESTEPS), *geometry.latent_shape[1:]], dtype="float16",
                         trajectory_timesteps=TIMESTEPS.tolist(), keep_indices=pairs[0].keep_indices,
                         geometry_fields=pairs[0].geometry, fingerprint=pairs[0].fingerprint)
    path = write_ode_lmdb(tmp_path / "db.lmdb", header, [(p.prompt, latents[p.index].numpy()) for p in pairs])
    return path, [latents[1], latents[0]]


def stripes(width: int, height: int) -> Image.Image:
    """Three vertical stripes: red | green | blue."""
    pixels = np.zeros((height, width, 3), np.uint8)
    third = width // 3
    pixels[:, :third], pixels[:, third : 2 * third], pixels[:, 2 * third :] = RED, GREEN, BLUE
    return Image.fromarray(pixels)


# --------------------------------------------------------------------------------------------- ODE pairs
def test_ode_dataset_items_and_collate(ode_lmdb):
    path, latents = ode_lmdb
    dataset = OdeLmdbDataset(path, tiny_geometry())
    assert len(dataset) == 2 and dataset.header["count"] == 2
    item = dataset[0]
    assert item["prompt"] == "a first"
    assert item["ode_latents"].dtype == torch.float32
    assert torch.equal(item["ode_latents"], latents[0].float())
    assert torch.equal(item["ode_timesteps"], TIMESTEPS)
    batch = collate([dataset[0], dataset[1]])
    assert batch["prompts"] == ["a first", "b second"]
    assert batch["ode_latents"].shape == (2, len(TIMESTEPS), *tiny_geometry().latent_shape[1:])
    assert batch["ode_timesteps"].shape == (2, len(TIMESTEPS))


@pytest.mark.parametrize("override, fragment", [
    ("video.height=64", "[6, 16, 8, 6]"),  # another pixel size
    ("video.num_frames=9", "[3, 16, 4, 6]"),  # another frame count
])
def test_ode_dataset_refuses_another_geometry(ode_lmdb, override, fragment):
    path, _ = ode_lmdb
    with pytest.raises(UserError) as err:
        OdeLmdbDataset(path, tiny_geometry(override, "video.num_frame_per_block=3"))
    message = one_line(err)
    assert str(path) in message and "[6, 16, 4, 6]" in message and fragment in message


def test_ode_dataset_refuses_a_missing_database(tmp_path):
    with pytest.raises(UserError) as err:
        OdeLmdbDataset(tmp_path / "nothing.lmdb", tiny_geometry())
    assert "create_lmdb.py" in one_line(err)


# --------------------------------------------------------------------------------------------- prompts
def test_text_prompts_skip_blank_lines(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("  a cat walks \n\n\na dog runs\n", encoding="utf-8")
    dataset = TextPromptDataset(path)
    assert [dataset[i]["prompt"] for i in range(len(dataset))] == ["a cat walks", "a dog runs"]


@pytest.mark.parametrize("content, fragment", [(None, "not found"), ("\n  \n", "is empty")])
def test_text_prompts_refuse_missing_or_empty_files(tmp_path, content, fragment):
    path = tmp_path / "prompts.txt"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError) as err:
        TextPromptDataset(path)
    message = one_line(err)
    assert fragment in message and str(path) in message


# --------------------------------------------------------------------------------------------- images
def test_load_image_covers_and_crops_the_centre(tmp_path):
    stripes(60, 20).save(tmp_path / "wide.png")
    image = load_image(tmp_path / "wide.png", 16, 16)  # scaled to 48x16, the middle 16 columns are the green stripe
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32
    assert image.min() >= -1.0 and image.max() <= 1.0
    green = torch.tensor([-1.0, 1.0, -1.0]).view(3, 1, 1)
    assert torch.allclose(image, green.expand_as(image), atol=0.1)  # bicubic rings slightly at the stripe edges
    # a tall image on a wide target keeps all three stripes (only rows are cropped)
    stripes(30, 90).save(tmp_path / "tall.png")
    image = load_image(tmp_path / "tall.png", 8, 12)
    assert image.shape == (3, 8, 12)
    assert image[0, :, 0].mean() > 0.9 and image[2, :, -1].mean() > 0.9


def test_load_image_refuses_unreadable_files(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"this is not a png")
    for name, fragment in (("broken.png", "cannot be read"), ("missing.png", "not found")):
        with pytest.raises(UserError) as err:
            load_image(tmp_path / name, 16, 16)
        message = one_line(err)
        assert fragment in message and name in message


def test_image_text_dataset(tmp_path):
    (tmp_path / "images").mkdir()
    stripes(48, 32).save(tmp_path / "images" / "first.png")
    (tmp_path / "pairs.txt").write_text("first.png\ta red circle moving left\n")
    dataset = ImageTextDataset(tmp_path / "pairs.txt", tmp_path / "images", 32, 48)
    item = dataset[0]
    assert item["prompt"] == "a red circle moving left" and item["image"].shape == (3, 32, 48)
    assert collate([item, item])["image"].shape == (2, 3, 32, 48)

    (tmp_path / "bad.txt").write_text("first.png a prompt without a tab\n")
    (tmp_path / "missing.txt").write_text("other.png\ta prompt\n")
    for name, fragment in (("bad.txt", "no tab-separated prompt"), ("missing.txt", "does not exist")):
        with pytest.raises(UserError) as err:
            ImageTextDataset(tmp_path / name, tmp_path / "images", 32, 48)
        assert fragment in one_line(err)
