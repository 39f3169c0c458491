"""Every figure of the toolkit, as plotly figures built from DataFrames or pruning outputs (no training here).

==========================  ====================================================================================
module                      figures
==========================  ====================================================================================
:mod:`.privacy_utility`     :func:`privacy_utility_figure` (accuracy vs ε per method, from a sweep)
:mod:`.memory`              :func:`memory_time_figure`, :func:`peak_memory_figure`, :func:`flops_memory_figure`,
                            :func:`scaling_figure` (from a bench or sweep table)
:mod:`.ablation`            :func:`ablation_figure` (+ :func:`ablation_flags`, :func:`ablation_contributions`),
                            :func:`tokens_accuracy_figure`, :func:`lora_rank_figure`
:mod:`.tokens`              :func:`token_overlay_figure`, :func:`score_map_figure`, :func:`spatial_histogram_figure`
                            (one pruning decision)
:mod:`.training`            :func:`training_curve_figure` (loss and ε spent per step)
:mod:`.runs`                :func:`runs_comparison_figure` (a session's runs: accuracy vs ε and vs time)
:mod:`.study`               :func:`tuning_figure`, :func:`study_figure` (the utility study, issue 14)
:mod:`.export`              :func:`save_figure` (.html always; .png/.svg/.pdf need kaleido + Chromium),
                            :class:`ImageExportError`
:mod:`.style`               method colours/labels (from :mod:`toolkit.vocabulary`), titles, chance line
==========================  ====================================================================================

Every title says what is plotted, over how many seeds, what the error bars are and the privacy unit (one record
= one source image), so a figure reads without the code. Example::

    >>> import tempfile
    >>> import pandas as pd
    >>> from toolkit.viz import privacy_utility_figure, save_figure
    >>> runs = pd.DataFrame(dict(method=["dp-sgd", "dp-sgd", "dual-priv", "dual-priv", "non-private"],
    ...                          epsilon=[1, 3, 1, 3, float("inf")], seed=0,
    ...                          accuracy=[0.55, 0.62, 0.58, 0.66, 0.90]))
    >>> fig = privacy_utility_figure(runs)
    >>> [trace.name for trace in fig.data]
    ['Non-private', 'DP-SGD', 'Dual-Priv']
    >>> save_figure(fig, tempfile.mkdtemp() + "/privacy_utility.html").name
    'privacy_utility.html'
"""
from toolkit.viz.ablation import (
    MECHANISMS, ablation_contributions, ablation_figure, ablation_flags, lora_rank_figure, tokens_accuracy_figure,
)
from toolkit.viz.export import ImageExportError, save_figure
from toolkit.viz.memory import flops_memory_figure, memory_time_figure, peak_memory_figure, scaling_figure
from toolkit.viz.privacy_utility import privacy_utility_figure
from toolkit.viz.runs import runs_comparison_figure
from toolkit.viz.study import study_figure, tuning_figure
from toolkit.viz.tokens import denormalize, score_map_figure, spatial_histogram_figure, token_overlay_figure
from toolkit.viz.training import training_curve_figure

__all__ = [
    "privacy_utility_figure", "memory_time_figure", "peak_memory_figure", "flops_memory_figure", "scaling_figure",
    "ablation_figure", "ablation_flags", "ablation_contributions", "MECHANISMS", "tokens_accuracy_figure",
    "lora_rank_figure", "token_overlay_figure", "score_map_figure", "spatial_histogram_figure", "denormalize",
    "training_curve_figure",
    "runs_comparison_figure", "tuning_figure", "study_figure", "save_figure", "ImageExportError",
]
