"""First-frame images for image-to-video distillation, taken from the teacher's own text-to-video ODE pairs.

    python scripts/first_frames.py --config_path configs/ode_ti2v_5B.yaml --data_path data/ode_pairs_5B \
        --output_folder data/first_frames_5B

Each pair's clean end holds the teacher's video for its prompt; its first latent frame is decoded by the recipe's
VAE (a causal VAE decodes the first latent frame alone into the first pixel frame) and written as
`<index>.png`, and `captions.tsv` lists `<index>.png<TAB>prompt`: the `image<TAB>prompt` list that
generate_ode_pairs.py (video.task ti2v) and the image-to-video DMD recipe read. No dataset is needed: the images are
the teacher's, at the recipe's size. Images already written are kept (run it again after an interruption); the
list is rewritten whole at the end.
"""
from __future__ import annotations

import argparse
import sys

import torch
from tqdm import tqdm

from utils.config import load_config, parse_cli
from utils.errors import OneLineArgumentParser, UserError, run_main
from utils.io import atomic_write, atomic_write_text, check_output_folder

CAPTIONS_FILE = "captions.tsv"


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = OneLineArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config_path", required=True, help="the image-to-video recipe whose VAE and size are used")
    parser.add_argument("--data_path", required=True, help="a folder of text-to-video ODE pairs (generate_ode_pairs.py)")
    parser.add_argument("--output_folder", required=True, help="where the images and captions.tsv go")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    return parse_cli(parser, argv)


@run_main
def main(argv: list[str] | None = None) -> int:
    import imageio.v3 as iio

    from pipeline.components import build_vae
    from pipeline.run_options import check_device
    from utils.geometry import resolve_recipe
    from utils.lmdb_store import read_pair_tensors, scan_pair_folder
    from utils.video_io import to_uint8_frames

    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    # 1. Every input checked before the VAE loads.
    config = load_config(args.config_path, overrides)
    recipe = resolve_recipe(config, need_scores=False)
    pairs = scan_pair_folder(args.data_path)
    if not pairs:
        raise UserError(f"--data_path {args.data_path} holds no ODE pairs: expected the folder generate_ode_pairs.py wrote")
    geometry = recipe.geometry
    latent = tuple(geometry.latent_shape[2:])
    for pair in pairs:
        made = tuple(pair.geometry["latent_shape"][1:])  # [C, H, W] of the pair's latent frames
        if made != latent or pair.geometry.get("vae") != geometry.vae:
            raise UserError(f"{pair.path} holds {pair.geometry.get('vae')} latents of {list(made)} (channels, height, "
                            f"width) but {args.config_path} decodes {geometry.vae} latents of {list(latent)}: use the "
                            "pairs of the same model and size")
    out = check_output_folder(args.output_folder, "--output_folder")
    out.mkdir(parents=True, exist_ok=True)
    device = check_device(args.device)

    # 2. Decode each pair's clean first latent frame into its first pixel frame.
    vae = build_vae(recipe.vae, device=device)
    lines = []
    for pair in tqdm(pairs, desc="first frames", dynamic_ncols=True):
        name = f"{pair.index:06d}.png"
        if not (out / name).is_file():
            clean = read_pair_tensors(pair.path)["ode_latents"][-1, :1]  # [1, C, h, w]
            with torch.no_grad():
                pixels = vae.decode_to_pixel(clean[None].to(device, vae.dtype))[0, :1].float().cpu()  # [1, 3, H, W]
            image = to_uint8_frames(pixels)[0]
            atomic_write(out / name, lambda tmp, image=image: iio.imwrite(tmp, image, extension=".png"))
        prompt = " ".join(pair.prompt.split())  # one line, no tab
        lines.append(f"{name}\t{prompt}")
    atomic_write_text(out / CAPTIONS_FILE, "\n".join(lines) + "\n")
    print(f"{len(lines)} first frames in {out}; image-prompt list {out / CAPTIONS_FILE}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
