"""Serve a causal student: a web page that plays video while it is generated, a WebSocket stream, a job API.

    python serve.py --config_path <recipe> --checkpoint <export folder> [--use_ema] [--host 127.0.0.1]
                    [--port 8000] [--max_active 1] [--max_queue 8] [--max_frames N] [--output_folder outputs/serve]
                    [--device cuda] [--dtype bf16] [--judge NAME|none] [key=value ...]

The pipeline (the same CausalInferencePipeline and rollout as inference.py) is loaded once; every finished
video is written like inference.py's (video.mp4, frames.png, inference_record.json) under --output_folder.
It binds to localhost unless --host says otherwise. With a judge (the recipe's evaluation.judge, or --judge: the
miniature's), each training-length segment is scored as it is decoded and the page draws adherence over time.
"""
from __future__ import annotations

import socket
import sys

from utils.errors import OneLineArgumentParser, UserError, run_main


def parse_args(argv: list[str] | None):
    from pipeline.run_options import DTYPES
    from utils.config import parse_cli

    parser = OneLineArgumentParser(prog="serve.py", description=__doc__.splitlines()[0])
    parser.add_argument("--config_path", required=True, help="the recipe (YAML)")
    parser.add_argument("--checkpoint", default=None, help="export folder, safetensors file or official Wan folder")
    parser.add_argument("--use_ema", action="store_true", help="the EMA weights of a trainer export")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: localhost only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max_active", type=int, default=1, help="streams generated at once")
    parser.add_argument("--max_queue", type=int, default=8, help="requests waiting behind them; more get 429")
    parser.add_argument("--max_frames", type=int, default=None,
                        help="longest video a request may ask for, in pixel frames (default: 20x the recipe's)")
    parser.add_argument("--output_folder", default="outputs/serve", help="where finished videos are written")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--allow_host", action="append", default=[],
                        help="a host name the server answers to besides IP addresses and localhost (repeatable)")
    parser.add_argument("--allow_origin", action="append", default=[],
                        help="a web origin besides the server's own page that may use it, e.g. https://my.site (repeatable)")
    parser.add_argument("--judge", default=None,
                        help="score each training-length segment live with this registered judge (the miniature's: "
                             "miniature, miniature_wrap); default: the recipe's evaluation.judge; none: off")
    return parse_cli(parser, argv)


def check_port(host: str, port: int) -> None:
    """The address must be free before minutes of loading are spent."""
    if not 0 < port < 65536:
        raise UserError(f"--port {port}: expected 1..65535")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            raise UserError(f"cannot listen on {host}:{port} ({err.strerror}): pick another --port or --host") from None


@run_main
def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    # 1. Every input checked before loading.
    from pathlib import Path

    from pipeline.causal_inference import CausalInferencePipeline
    from pipeline.components import check_light_decoder
    from pipeline.run_options import check_device, default_dtype
    from utils.config import load_config
    from utils.geometry import max_pixel_frames, pixel_frames_for, resolve_recipe
    from utils.io import check_output_folder
    from utils.registry import JUDGES
    from wan.loading import recipe_for_checkpoint, resolve_generator_weights

    if args.max_active < 1:
        raise UserError(f"--max_active {args.max_active}: expected at least 1 stream")
    if args.max_queue < 0:
        raise UserError(f"--max_queue {args.max_queue}: expected 0 or more waiting requests")
    config = recipe_for_checkpoint(load_config(args.config_path, overrides), args.checkpoint)
    resolved = resolve_recipe(config, need_scores=False, check_weights=False)
    check_light_decoder(config, resolved.vae)
    geometry = resolved.geometry
    longest = max_pixel_frames(config, geometry.vae_stride[0])
    max_frames = args.max_frames or min(pixel_frames_for(20 * geometry.num_latent_frames, geometry.vae_stride[0]), longest)
    if not 1 <= max_frames <= longest:
        raise UserError(f"--max_frames {max_frames}: expected 1 .. {longest} pixel frames (the RoPE position table "
                        "holds that many)")
    check_output_folder(args.output_folder, "--output_folder")
    device = check_device(args.device)
    resolve_generator_weights(args.checkpoint, args.use_ema, resolved.generator.arch)
    check_port(args.host, args.port)
    judge_name = config.evaluation.judge if args.judge is None else (None if args.judge == "none" else args.judge)
    if judge_name is not None and judge_name not in JUDGES:
        raise UserError(f"--judge {judge_name}: expected none or a registered judge ({', '.join(JUDGES.kinds())})")

    # 2. Load once, then serve.
    import uvicorn

    from service.app import AccessRules, create_app
    from service.jobs import JobManager

    dtype = default_dtype(args.dtype, device)
    pipe = CausalInferencePipeline(config, resolved, device, dtype, checkpoint=args.checkpoint, use_ema=args.use_ema)
    parameters = {"config_path": args.config_path, "overrides": overrides, "checkpoint": args.checkpoint,
                  "use_ema": args.use_ema, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
                  "served": True, "fps": config.video.fps}
    manager = JobManager(pipe, Path(args.output_folder), max_active=args.max_active, max_queue=args.max_queue,
                         max_frames=max_frames, parameters=parameters,
                         judge=None if judge_name is None else JUDGES.get(judge_name)(),
                         segment_frames=geometry.num_pixel_frames)
    info = {"model": args.checkpoint or "recipe generator (random weights)", "device": str(device),
            "width": geometry.width, "height": geometry.height, "num_frames": geometry.num_pixel_frames,
            "fps": config.video.fps, "task": config.video.task, "decoder": pipe.decoder_name,
            "takes_image": pipe.takes_image, "needs_image": pipe.needs_image, "judge": judge_name,
            "segment_frames": geometry.num_pixel_frames}
    app = create_app(manager, info, AccessRules(allow_hosts=tuple(h.lower() for h in args.allow_host),
                                                allow_origins=tuple(args.allow_origin)))
    print(f"serving on http://{args.host}:{args.port} (load {pipe.load_s:.1f} s)", flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", ws_max_size=32 << 20)
    finally:
        manager.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
