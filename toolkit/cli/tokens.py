"""``python -m toolkit tokens``: prune one image's visual tokens with a strategy; JSON + optional picture.

Example::

    python -m toolkit tokens --strategy dual-priv --keep 16 --example 3 --out overlay.html --json tokens.json
"""
from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

from toolkit.cli import subcommand
from toolkit.data import make_vqa, preprocess_images
from toolkit.models import PRESETS, build_model, load_model
from toolkit.tokens import STRATEGIES, make_pruner
from toolkit.viz import ImageExportError, save_figure, spatial_histogram_figure, token_overlay_figure
from toolkit.viz.export import SUFFIXES as FIGURE_SUFFIXES


def _load_bundle(args):
    if args.model_dir:
        return load_model(args.model_dir)
    return build_model(args.preset or "tiny", seed=args.model_seed)


def _load_image(args, bundle):
    """(pixel_values [1, 3, H, W], a description of where the image came from)."""
    if args.image:
        path = Path(args.image).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"image {str(path)!r} does not exist")
        try:
            with Image.open(path) as img:
                image = img.convert("RGB")
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"image {str(path)!r} is unreadable ({err})") from err
        source = dict(image=str(path))
    else:
        dataset = make_vqa("digit", "test", image_size=bundle.image_size)
        if not 0 <= args.example < len(dataset):
            raise ValueError(f"--example {args.example} is outside the digit test split (0..{len(dataset) - 1})")
        record = dataset[args.example]
        image = record.image
        source = dict(example=args.example, record_id=record.id, answer=record.answer)
    pixels = preprocess_images([image], bundle.image_size, bundle.image_mean, bundle.image_std)
    return pixels, source


@subcommand("tokens", help="prune one image's visual tokens with a strategy; JSON and an optional overlay picture")
def run(args) -> dict:
    for flag, path in (("--out", args.out), ("--hist-out", args.hist_out)):
        if path and Path(path).suffix.lower() not in FIGURE_SUFFIXES:
            raise ValueError(f"{flag} {path!r}: the picture must end in .html, .png, .svg or .pdf")
    options = {}
    if args.n_contextual is not None:
        options["n_contextual"] = args.n_contextual
    if args.seed is not None:
        options["seed"] = args.seed
    bundle = _load_bundle(args)
    pruner = make_pruner(args.strategy, bundle, keep=args.keep, token_prune_ratio=args.token_prune_ratio,
                         layer=args.layer, **options)
    pixels, source = _load_image(args, bundle)
    output = pruner.from_pixels(bundle, pixels).example(0)
    result = dict(output.to_dict(0), model=bundle.preset, source=source, pruner=pruner.describe())
    pictures = []
    try:
        if args.out:
            figure = token_overlay_figure(output, pixels[0], bundle.image_mean, bundle.image_std)
            pictures.append(str(save_figure(figure, args.out)))
        if args.hist_out:
            pictures.append(str(save_figure(spatial_histogram_figure(output), args.hist_out)))
    except ImageExportError as err:
        raise ValueError(str(err)) from err  # the CLI reports ValueErrors as "error: ..." with exit status 2
    result["pictures"] = pictures
    fused_from = output.n_in - result["n_kept"] - result["n_dropped"]
    parts = (["[CLS]"] if output.cls_slot is not None else []) + [f"{result['n_kept']} kept"] + (
        [f"{result['n_contextual']} fused from {fused_from} patches"] if result["n_contextual"] else [])
    print(f"{output.strategy}: {output.n_in} patches -> {output.n_out} visual tokens "   # the parts sum to n_out
          f"({' + '.join(parts)}; {result['n_dropped']} patches dropped)"
          + (f"; wrote {', '.join(pictures)}" if pictures else ""))
    return result


@run.configure
def configure(parser) -> None:
    parser.add_argument("--strategy", required=True, choices=sorted(STRATEGIES), help="token pruning strategy")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--keep", type=int, help="visual tokens fed to the LLM (n_out)")
    budget.add_argument("--token-prune-ratio", type=float, help="fraction of patches removed, in [0, 1)")
    parser.add_argument("--layer", type=int,
                        help="0-based scoring layer of the vision tower (default: the one LLaVA takes features from)")
    parser.add_argument("--n-contextual", type=int, help="fused tokens among the kept ones (fusing strategies)")
    parser.add_argument("--seed", type=int, help="run-level seed of the 'random' strategy")
    image = parser.add_mutually_exclusive_group()
    image.add_argument("--image", help="an image file (resized to the model's input)")
    image.add_argument("--example", type=int, default=0, help="index in the embedded digit test split (default 0)")
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--preset", choices=sorted(PRESETS), help="a tiny model built from config (default: tiny)")
    model.add_argument("--model-dir", help="a local LLaVA model directory")
    parser.add_argument("--model-seed", type=int, default=0, help="initialisation seed of a preset model")
    parser.add_argument("--out", help="overlay picture: .html (always works) or .png/.svg/.pdf (needs Chromium)")
    parser.add_argument("--hist-out", help="kept-per-row/column histogram picture (.html/.png/.svg/.pdf)")
