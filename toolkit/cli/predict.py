"""``python -m toolkit predict``: answer every record of a LLaVA JSON/JSONL file with an exported model.

    python -m toolkit predict --model model --data photos/test.json --image-folder photos --json predictions.json

The JSON holds one prediction per record (id, question, prediction, and answer / correct where the record has
an answer), the answering mode and the accuracy over the answered records.
"""
from __future__ import annotations

import json

from toolkit.cli import subcommand


@subcommand("predict", help="answer every record of a LLaVA JSON/JSONL file with an exported model")
def run(args) -> dict:
    from toolkit.predict import predict

    result = predict(args.model, args.data, image_folder=args.image_folder, mode=args.mode, limit=args.limit,
                     batch_size=args.batch_size, device=args.device)
    shown = {k: result[k] for k in ("model", "data", "mode", "records", "accuracy")}
    shown["candidates"] = len(result["candidates"])
    print(json.dumps(shown, indent=2, default=str))
    if not args.json:
        for row in result["predictions"]:
            print(json.dumps(row, ensure_ascii=False))
    return result


@run.configure
def configure(parser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR", help="a folder written by train --output-dir")
    parser.add_argument("--data", required=True, metavar="FILE", help="a LLaVA JSON or JSONL file")
    parser.add_argument("--image-folder", metavar="DIR", help="where the image paths point (default: FILE's folder)")
    parser.add_argument("--mode", default="saved", choices=("saved", "closed-set", "generate"),
                        help="how to answer: as the model was evaluated (saved), rank candidates, or generate")
    parser.add_argument("--limit", type=int, help="the first N records only")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
