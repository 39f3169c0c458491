"""``python -m toolkit tokens``: the pruning JSON, the pictures it writes, and its errors (exit status 2)."""
from __future__ import annotations

import json

import pytest

from toolkit.cli import main
from toolkit.data import make_vqa


def test_cli_writes_the_pruning_json_and_an_overlay(tmp_path, capsys):
    out_json, overlay = tmp_path / "tokens.json", tmp_path / "overlay.html"
    rc = main(["tokens", "--strategy", "dual-priv", "--keep", "16", "--example", "2", "--out", str(overlay),
               "--json", str(out_json)])
    assert rc == 0 and overlay.is_file()
    result = json.loads(out_json.read_text())
    assert (result["strategy"], result["n_in"], result["n_out"], result["layer"]) == ("dual-priv", 64, 16, 1)
    assert len(result["kept_indices"]) == 13 and len(result["scores"]) == 64 and len(result["clusters"]) == 64
    assert result["source"]["example"] == 2 and result["pictures"] == [str(overlay)]
    # the summary's parts add up to the tokens the LM reads: [CLS] is one of them
    assert "64 patches -> 16 visual tokens ([CLS] + 13 kept + 2 fused from 51 patches; 0 patches dropped)" in capsys.readouterr().out


def test_cli_takes_an_image_file_and_a_prune_ratio(tmp_path, capsys):
    image = tmp_path / "digit.png"
    make_vqa("digit", "test", image_size=32, limit=1)[0].image.save(image)
    out_json = tmp_path / "t.json"
    rc = main(["tokens", "--strategy", "mean-attention", "--token-prune-ratio", "0.75", "--image", str(image),
               "--preset", "tiny-siglip", "--json", str(out_json)])
    result = json.loads(out_json.read_text())
    assert rc == 0 and result["n_out"] == 16 and result["source"]["image"] == str(image)
    assert "64 patches -> 16 visual tokens (16 kept; 48 patches dropped)" \
        in capsys.readouterr().out     # no [CLS] in a SigLIP tower, so none is counted


@pytest.mark.parametrize("argv, message", [
    (["--strategy", "dual-priv", "--keep", "16", "--preset", "tiny-siglip"], "no [CLS] token"),
    (["--strategy", "pool", "--keep", "13"], "keep=13 must be rows x cols"),
    (["--strategy", "random", "--keep", "100"], "larger than the 64 patches"),
    (["--strategy", "random", "--token-prune-ratio", "1.5"], "token_prune_ratio must be in [0, 1)"),
    (["--strategy", "random"], "needs a budget"),
    (["--strategy", "dual-priv", "--keep", "16", "--layer", "5"], "layer 5 is outside"),
    (["--strategy", "random", "--keep", "8", "--example", "5000"], "--example 5000 is outside"),
    (["--strategy", "random", "--keep", "8", "--image", "/nonexistent.png"], "does not exist"),
    (["--strategy", "random", "--keep", "8", "--out", "x.gif"], "must end in .html"),
])
def test_cli_reports_bad_input_as_an_error_with_exit_status_2(argv, message, capsys):
    assert main(["tokens", *argv]) == 2
    assert message in capsys.readouterr().err
