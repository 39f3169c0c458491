"""The Visual tokens tab: prune one image's visual tokens with a strategy and budget, and draw the decision (the
overlay on the image and where the kept patches lie). The image is a test example of the embedded data or an
upload; the pruner is ``toolkit.tokens.make_pruner`` on the app's (warm-started) model.
"""
from __future__ import annotations

import functools
from pathlib import Path

import gradio as gr
from PIL import Image, UnidentifiedImageError

from toolkit.dashboard import model
from toolkit.dashboard.budget import budget_controls, token_budget
from toolkit.dashboard.common import AppSettings, InputError, message_html, routed, ui_integer, warn
from toolkit.data import make_vqa, preprocess_images
from toolkit.tokens import STRATEGIES, make_pruner
from toolkit.viz import spatial_histogram_figure, token_overlay_figure

MAX_UPLOAD_PIXELS = 40_000_000
IMAGE_FORMATS = "PNG, JPEG, BMP, GIF or WebP"

HELP = dict(
    strategy=("dual-priv: the patches [CLS] attends to most + contextual tokens fused from the rest; random / "
              "uniform / pool / divprune / mean-attention: baselines; none: every token."),
    example="Index of an image in the embedded digit test split (0 to {last}).",
    upload="Or upload an image (PNG, JPEG, ...): it is resized to the model's input; it overrides the example.",
)


def load_upload(path) -> Image.Image:
    """An uploaded file as an RGB PIL image, or :class:`InputError` (missing, not an image, too large)."""
    path = getattr(path, "name", path)
    if not path or not Path(path).is_file():
        raise InputError("the uploaded file is missing: upload it again")
    name = Path(path).name
    try:
        with Image.open(path) as img:
            width, height = img.size
            if width * height > MAX_UPLOAD_PIXELS:
                raise InputError(f"the uploaded image is too large ({width}x{height} pixels; at most "
                                 f"{MAX_UPLOAD_PIXELS:,} pixels)")
            img.load()
            return img.convert("RGB")
    except InputError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        # What PIL says (e.g. "cannot identify image file '/tmp/…'") names a server path: say it for people.
        raise InputError(f"the uploaded file {name!r} is not an image that can be read; upload a "
                         f"{IMAGE_FORMATS} image") from None


@functools.lru_cache(maxsize=2)
def test_images(image_size: int):
    """The embedded digit test split (the only records the app shows: never private ones)."""
    return make_vqa("digit", "test", image_size=image_size)


def example_count(settings: AppSettings) -> int:
    return len(test_images(model.geometry_bundle(settings.preset).image_size))


def tokens_view(settings: AppSettings, example, upload, strategy, budget_mode, token_prune_ratio,
                keep_tokens) -> dict:
    """Prune one image's visual tokens and draw the decision. Returns ``overlay`` and ``histogram`` (plotly
    figures), ``counts`` (dict) and ``status`` (HTML); on a bad input the figures and counts are None."""
    blank = dict(overlay=None, histogram=None, counts=None)
    try:
        budget = token_budget(settings, strategy, budget_mode, token_prune_ratio, keep_tokens)
        if upload:
            image = load_upload(upload)
            source = f"uploaded image {Path(getattr(upload, 'name', upload)).name!r}"
        else:
            dataset = test_images(model.geometry_bundle(settings.preset).image_size)
            index = ui_integer("example", example, minimum=0, maximum=len(dataset) - 1)
            record = dataset[index]
            image = record.image
            source = f"test example {index} (digit {record.answer})"
    except InputError as err:
        return dict(blank, status=warn(f"Nothing shown: {err}"))
    training = model.warm_start_progress(settings)
    if training is not None:  # the launch's warm start is training: say so rather than block the page on it
        return dict(blank, status=message_html(f"The public warm start is being trained ({training}); this view "
                                               "runs its vision tower, so it shows tokens once that is done.", "info"))
    bundle = model.get_bundle(settings)
    pruner = make_pruner(strategy, bundle, **budget)
    pixels = preprocess_images([image], bundle.image_size, bundle.image_mean, bundle.image_std)
    output = pruner.from_pixels(bundle, pixels).example(0)
    info = output.to_dict(0)
    counts = dict(source=source, strategy=strategy, patches_in=info["n_in"], tokens_out=info["n_out"],
                  cls=info["cls_slot"] is not None, kept=info["n_kept"], fused=info["n_contextual"],
                  dropped=info["n_dropped"], scoring_layer=info["layer"])
    text = (f"{source}: {info['n_in']} patches -> {info['n_out']} visual tokens "
            f"({'[CLS] + ' if counts['cls'] else ''}{info['n_kept']} kept, {info['n_contextual']} fused, "
            f"{info['n_dropped']} dropped)")
    return dict(overlay=token_overlay_figure(output, pixels[0], bundle.image_mean, bundle.image_std),
                histogram=spatial_histogram_figure(output), counts=counts, status=message_html(text, "ok"))


def build(settings: AppSettings) -> list:
    """The Visual tokens tab (inside the app's ``gr.Blocks``); returns its events that may train the warm start."""
    s = settings
    n_examples = example_count(s)
    n_patches = model.geometry_bundle(s.preset).n_patches
    with gr.Tab("Visual tokens", id="tokens"):
        with gr.Row():
            with gr.Column(scale=2):
                example = gr.Slider(0, n_examples - 1, value=0, step=1, label="Test image",
                                    info=HELP["example"].format(last=n_examples - 1), elem_id="tok-example")
                upload = gr.File(label="Upload an image (overrides the test image)", file_count="single",
                                 type="filepath", elem_id="tok-upload")
                gr.Markdown(HELP["upload"])
                strategy = gr.Dropdown(sorted(STRATEGIES), value="dual-priv", label="Strategy", info=HELP["strategy"],
                                       elem_id="tok-strategy")
                mode, ratio, keep = budget_controls(("tok-budget-mode", "tok-ratio", "tok-keep"),
                                                    mode_label="Budget given as",
                                                    keep_info=f"Visual tokens fed to the LLM (1 to {n_patches}).")
                show_button = gr.Button("Show tokens", variant="primary", elem_id="tok-run")
            with gr.Column(scale=3):
                status = gr.HTML(message_html("Pick an image and a budget, then press Show tokens."),
                                 elem_id="tok-status")
                overlay = gr.Plot(label="Pruning decision", elem_id="tok-overlay")
                counts = gr.JSON(label="Counts", elem_id="tok-counts")
                histogram = gr.Plot(label="Where the kept patches lie", elem_id="tok-hist")
    outputs = dict(status=status, overlay=overlay, histogram=histogram, counts=counts)

    def show(example_v, upload_v, strategy_v, mode_v, ratio_v, keep_v, progress=gr.Progress(track_tqdm=True)):
        # track_tqdm: the first view may train the public warm start; its tqdm bar shows in the page
        return routed(tokens_view(s, example_v, upload_v, strategy_v, mode_v, ratio_v, keep_v), outputs)

    inputs = [example, upload, strategy, mode, ratio, keep]
    events = [show_button.click(show, inputs, list(outputs.values()), concurrency_limit=1, api_name="tokens"),
              example.release(show, inputs, list(outputs.values()), concurrency_limit=1, show_progress="minimal",
                              api_name=False),
              upload.upload(show, inputs, list(outputs.values()), concurrency_limit=1, api_name=False)]
    return events
