"""The Visual tokens tab: prune one image's visual tokens with a strategy and budget, and show the decision: the
image as given beside the score map, the decision drawn on the model's input (kept patches outlined, each
contextual cluster in its legend's colour), where the kept patches lie, and the counts in a sentence. The image is
a test example of the embedded data or an upload (letterboxed to the square input, said in words); the pruner is
``toolkit.tokens.make_pruner`` on the app's (warm-started) model.
"""
from __future__ import annotations

import functools
from pathlib import Path

import gradio as gr

from toolkit.dashboard import model
from toolkit.dashboard.budget import budget_controls, token_budget
from toolkit.dashboard.common import AppSettings, InputError, message_html, routed, ui_integer, warn
from toolkit.dashboard.images import enlarged, fit_note, letterbox, load_upload
from toolkit.data import make_vqa
from toolkit.tokens import STRATEGIES, make_pruner
from toolkit.viz import score_map_figure, spatial_histogram_figure, token_overlay_figure

HELP = dict(
    strategy=("dual-priv: the patches [CLS] attends to most + contextual tokens fused from the rest; random / "
              "uniform / pool / divprune / mean-attention: baselines; none: every token."),
    example="Index of an image in the embedded digit test split (0 to {last}).",
    upload=("Or upload an image (PNG, JPEG, ...): it overrides the test image. A non-square image is letterboxed "
            "(black bars, nothing stretched) to the model's square input, and the page says so."),
)
SCORE_MEANING = {
    "cls-attention": ("Score = how much attention the [CLS] token pays to each patch at layer {layer} of the vision "
                      "tower (mean over heads): the highest-scored patches are kept as themselves."),
    "mean-attention": ("Score = the mean attention each patch receives from all patches at layer {layer} of the "
                       "vision tower: the highest-scored patches are kept as themselves."),
}
NO_SCORE = "This strategy does not score patches (it chooses by position, chance or diversity): no score map."


@functools.lru_cache(maxsize=2)
def test_images(image_size: int):
    """The embedded digit test split (the only records the app shows: never private ones)."""
    return make_vqa("digit", "test", image_size=image_size)


def example_count(settings: AppSettings) -> int:
    return len(test_images(model.geometry_bundle(settings.preset).image_size))


def counts_sentence(info: dict) -> str:
    """The pruning decision in words, e.g. "Kept 12 of 64 patches + [CLS]; 3 contextual tokens fuse the other 52."."""
    n_in, n_kept, n_fused, n_dropped = info["n_in"], info["n_kept"], info["n_contextual"], info["n_dropped"]
    cls = " + [CLS]" if info["cls_slot"] is not None else ""
    if info["strategy"] == "none" or (n_kept == n_in and not n_fused):
        return f"Kept all {n_in} patches{cls} (no pruning): {info['n_out']} visual tokens reach the LLM."
    parts = [f"Kept {n_kept} of {n_in} patches{cls}"]
    fused_patches = n_in - n_kept - n_dropped
    if n_fused:
        parts.append(f"{n_fused} contextual token{'s' if n_fused != 1 else ''} fuse the other {fused_patches}")
    if n_dropped:
        parts.append(f"{'the other ' if not n_fused else ''}{n_dropped} {'are' if n_dropped != 1 else 'is'} dropped")
    return "; ".join(parts) + f". {info['n_out']} visual tokens reach the LLM instead of {n_in}."


def score_sentence(strategy: str, layer) -> str:
    """One line on what the strategy's score means (or that it has none)."""
    if STRATEGIES[strategy].keeps_all:
        return "Every patch is kept, so nothing is scored."
    kind = STRATEGIES[strategy].score
    return SCORE_MEANING[kind].format(layer=layer) if kind in SCORE_MEANING else NO_SCORE


def tokens_view(settings: AppSettings, example, upload, strategy, budget_mode, token_prune_ratio,
                keep_tokens) -> dict:
    """Prune one image's visual tokens and draw the decision. Returns ``original`` (the image as given),
    ``overlay``, ``scores`` (None for a strategy without scores) and ``histogram`` (plotly figures), ``summary``
    (Markdown: the decision in words, how the image was fitted, what the score means), ``counts`` (dict) and
    ``status`` (HTML); on a bad input everything but the status is None."""
    blank = dict(original=None, overlay=None, scores=None, histogram=None, summary="", counts=None)
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
    pixels = bundle.preprocess([letterbox(image)])  # the model's own preprocessing, on the letterboxed square
    output = pruner.from_pixels(bundle, pixels).example(0)
    info = output.to_dict(0)
    counts = dict(source=source, strategy=strategy, patches_in=info["n_in"], tokens_out=info["n_out"],
                  cls=info["cls_slot"] is not None, kept=info["n_kept"], fused=info["n_contextual"],
                  dropped=info["n_dropped"], scoring_layer=info["layer"], size=list(image.size))
    text = (f"{source}: {info['n_in']} patches -> {info['n_out']} visual tokens "
            f"({'[CLS] + ' if counts['cls'] else ''}{info['n_kept']} kept, {info['n_contextual']} fused, "
            f"{info['n_dropped']} dropped)")
    summary = "\n\n".join([f"**{counts_sentence(info)}**", fit_note(image.size, bundle.image_size),
                            score_sentence(strategy, info["layer"])])
    # the overlay without the heatmap: the score has its own map, so the image is not hidden under a tint
    overlay = token_overlay_figure(output, pixels[0], bundle.image_mean, bundle.image_std, show_scores=False)
    scores = score_map_figure(output, STRATEGIES[strategy].score) if output.scores is not None else None
    return dict(original=image, overlay=overlay, scores=scores, histogram=spatial_histogram_figure(output),
                summary=summary, counts=counts, status=message_html(text, "ok"))


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
                summary = gr.Markdown(elem_id="tok-summary")
                with gr.Row():
                    original = gr.Image(label="The image as given (small ones enlarged)", type="pil",
                                        interactive=False, height=300,
                                        elem_id="tok-original")
                    scores = gr.Plot(label="Pruning score per patch", elem_id="tok-scores")
                overlay = gr.Plot(label="Pruning decision on the model's input", elem_id="tok-overlay")
                histogram = gr.Plot(label="Where the kept patches lie", elem_id="tok-hist")
    outputs = dict(status=status, summary=summary, original=original, scores=scores, overlay=overlay,
                   histogram=histogram)

    def show(example_v, upload_v, strategy_v, mode_v, ratio_v, keep_v, progress=gr.Progress(track_tqdm=True)):
        # track_tqdm: the first view may train the public warm start; its tqdm bar shows in the page
        view = tokens_view(s, example_v, upload_v, strategy_v, mode_v, ratio_v, keep_v)
        view.pop("counts")  # the summary says it in words
        if view["original"] is not None:
            view["original"] = enlarged(view["original"])  # a 32-pixel digit would show as a speck
        return routed(view, outputs)

    inputs = [example, upload, strategy, mode, ratio, keep]
    events = [show_button.click(show, inputs, list(outputs.values()), concurrency_limit=1, api_name="tokens"),
              example.release(show, inputs, list(outputs.values()), concurrency_limit=1, show_progress="minimal",
                              api_name=False),
              upload.upload(show, inputs, list(outputs.values()), concurrency_limit=1, api_name=False)]
    return events
