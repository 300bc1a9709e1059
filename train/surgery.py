"""Start a new training stage from an older one's weights, with recorded edits.

    python -m train.surgery SOURCE OUT.safetensors [--locality SCALE=VALUE ...] [--token-step-factor F]
        [--pixel-warp blend|flow] [--hold-mask] [--channels C0,C1,C2,C3 --name NAME]

SOURCE is a run's checkpoint.pt or a weights file. Modules the current code has and SOURCE lacks
keep their initialisation (seeded, so the output is reproducible). The edits are the ones the
default model's history needed (MODEL.md): relaxing one scale's attention locality, scaling
the token quantization step, switching how the finest scale moves reference pixels (a config
change with the same parameters), adding D_F's hold mask (new parameters, initialised as
`FrameDecoder` does), and narrowing every scale to fewer channels (`train.shrink`, the start of
the distilled fast preset).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import replace
from pathlib import Path

import torch

from codec.nn.model import build_model
from codec.nn.weights import load_weights, save_weights
from train.export import checkpoint_model_config
from train.shrink import shrink


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m train.surgery", description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--locality", action="append", default=[], metavar="SCALE=VALUE",
                        help="set the cross-attention locality of scale SCALE (0 = finest) to VALUE")
    parser.add_argument("--token-step-factor", type=float, default=1.0)
    parser.add_argument("--pixel-warp", choices=["blend", "flow"], default=None)
    parser.add_argument("--hold-mask", action="store_true", help="add D_F's mask that holds the newest reference")
    parser.add_argument("--channels", default=None, help="narrow to these channels per scale, fine to coarse (train.shrink)")
    parser.add_argument("--name", default=None, help="the narrowed model's preset name")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if args.source.suffix == ".pt":
        ckpt = torch.load(args.source, weights_only=True)
        model = build_model(checkpoint_model_config(ckpt))
        result = model.load_state_dict(ckpt["model"], strict=False)
        print(f"{args.source} (step {ckpt['step']}): initialised anew: {result.missing_keys}")
    else:
        model = load_weights(args.source, strict=False)
    edits = ({"pixel_warp": args.pixel_warp} if args.pixel_warp else {}) | ({"hold_mask": True} if args.hold_mask else {})
    if edits:
        switched = build_model(replace(model.cfg, **edits))
        result = switched.load_state_dict(model.state_dict(), strict=False)
        if result.unexpected_keys:
            raise SystemExit(f"{args.source}: parameters the edited model lacks: {result.unexpected_keys}")
        if result.missing_keys:
            print(f"new parameters, initialised: {result.missing_keys}")
        model = switched
    if args.channels:
        model = shrink(model, tuple(int(c) for c in args.channels.split(",")), args.name or model.cfg.name)
    with torch.no_grad():
        for edit in args.locality:
            scale, value = edit.split("=")
            model.alignment.cross[int(scale)].log_locality.fill_(math.log(float(value)))
        model.token_log_step += math.log(args.token_step_factor)
    save_weights(model, args.out)
    print(f"{args.out}: written")


if __name__ == "__main__":
    main()
