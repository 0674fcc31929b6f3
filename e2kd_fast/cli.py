"""The ``e2kd-fast`` command line (also ``python -m e2kd_fast``).

e2kd-fast train --config configs/x.yaml [--set optim.lr=3e-4 ...] [--resume auto|PATH [--resume-force]]
e2kd-fast eval --config configs/x.yaml --checkpoint runs/x/checkpoints/last.pt
e2kd-fast explain --model bcos_resnet18 --checkpoint ckpt.pt --out explanations/ img1.jpg img2.png
e2kd-fast precompute --config configs/x_frozen.yaml
e2kd-fast demo [--out runs/demo]
e2kd-fast report runs/kd runs/e2kd --out reports/x [--images 4]
e2kd-fast xdistill configs/xdistill/synthetic.yaml --out runs/xdistill
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from e2kd_fast import __version__


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, type=Path, help="YAML configuration file")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value with a dotted key, e.g. --set optim.lr=3e-4 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="e2kd-fast", description="Explanation-enhanced knowledge distillation.")
    parser.add_argument("--version", action="version", version=f"e2kd-fast {__version__}")
    # The `deepspeed` launcher puts --local_rank=N before the sub-command; LOCAL_RANK (env) is what is used.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a student (e²KD, KD or supervised) from a config")
    _add_config_args(train)
    train.add_argument("--resume", default=None, help="'auto' (the run's last.pt if present) or a checkpoint path")
    train.add_argument(
        "--resume-force",
        action="store_true",
        help="resume although the config changed in settings that change the result (they are listed, "
        "then recorded in metrics.jsonl); without it such a resume is refused",
    )
    train.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar; the log lines (one per epoch, compiles, evaluations, checkpoints) still go to "
        "stderr and <out_dir>/train.log",
    )

    evaluate = commands.add_parser("eval", help="evaluate a checkpoint on the config's validation data")
    _add_config_args(evaluate)
    evaluate.add_argument("--checkpoint", required=True, type=Path, help="student checkpoint to evaluate")

    explain = commands.add_parser("explain", help="write PNG explanations of images for a model")
    explain.add_argument("images", nargs="+", type=Path, help="image files")
    explain.add_argument("--model", required=True, help="registered model name (e2kd_fast.models.list_models())")
    explain.add_argument("--checkpoint", type=Path, default=None, help="weights to load (default: random init)")
    explain.add_argument("--num-classes", type=int, default=None, help="number of classes of the checkpoint")
    explain.add_argument("--target", type=int, default=None, help="class to explain (default: the top-1)")
    explain.add_argument("--image-size", type=int, default=224, help="center crop size (default 224)")
    explain.add_argument("--resize", type=int, default=256, help="resize before cropping (default 256)")
    explain.add_argument("--out", type=Path, default=Path("explanations"), help="output folder")

    precompute = commands.add_parser("precompute", help="store a frozen teacher's logits and explanations")
    _add_config_args(precompute)
    precompute.add_argument(
        "--map-dtype", default="fp16", choices=("fp32", "fp16", "bf16", "int8"), help="map storage (default fp16)"
    )
    precompute.add_argument("--map-scale", type=int, default=1, help="store maps at 1/N resolution (default 1)")
    precompute.add_argument("--shard-size", type=int, default=1024, help="images per shard file (default 1024)")
    precompute.add_argument(
        "--max-shards", type=int, default=None, help="stop after N shards (run again to go on; 0: compute nothing)"
    )
    precompute.add_argument(
        "--report-fidelity", action="store_true", help="print stored-vs-exact cosine and bytes/image per option"
    )
    precompute.add_argument("--no-progress", action="store_true", help="no progress bar")

    demo = commands.add_parser("demo", help="the built-in demo (see README)")
    demo.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default runs/demo)")
    demo.add_argument("--quick", action="store_true", help="a tiny run that checks the pipeline (seconds)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")

    report = commands.add_parser("report", help="compare run folders in one HTML page (and markdown)")
    report.add_argument("runs", nargs="+", type=Path, help="run folders (train.out_dir of each run)")
    report.add_argument("--out", required=True, type=Path, help="output folder for report.html / report.md")
    report.add_argument("--images", type=int, default=4, help="validation images in the explanation grid")
    report.add_argument("--checkpoint", default="last", help="'last' (default), 'best' or a checkpoint path")
    report.add_argument("--split", default=None, help="evaluate this split instead of each run's data.val_split")
    report.add_argument("--max-eval", type=int, default=None, help="evaluate the first N validation images only")
    report.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to evaluate")
    report.add_argument("--unicam", action="store_true", help="also compute FSS / RS of each student vs its teacher")

    xdistill = commands.add_parser("xdistill", help="run the XDistillation pipeline (docs/xdistill.md)")
    xdistill.add_argument("config", type=Path, help="XDistillation YAML config (configs/xdistill/)")
    xdistill.add_argument("--out", required=True, type=Path, help="run folder (metrics.json, checkpoints)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        # Configuration and data errors name the key or file; a traceback would only hide that.
        print(f"e2kd-fast {args.command}: error: {err}", file=sys.stderr)
        return 2


def _train(args: argparse.Namespace) -> int:
    from e2kd_fast.config import load_config
    from e2kd_fast.data.build import build_datasets
    from e2kd_fast.engine import Trainer, TrainingInterrupted
    from e2kd_fast.engine.builders import check_model_settings

    cfg = load_config(args.config, args.overrides)
    check_model_settings(cfg)  # model names and arguments, before any data is read
    data = build_datasets(cfg)
    trainer = Trainer(
        cfg,
        data.train,
        data.val,
        train_indices=data.train_indices,
        val_indices=data.val_indices,
        show_progress=not args.no_progress,
    )
    try:
        summary = trainer.fit(resume=args.resume, resume_force=args.resume_force)
    except TrainingInterrupted as stop:
        # SIGTERM / SIGINT: last.pt holds the finished step; the status is the signal's (143, 130).
        if trainer.strategy.is_main:
            again = ["e2kd-fast", "train", "--config", str(args.config)]
            again += [part for item in args.overrides for part in ("--set", item)] + ["--resume", "auto"]
            print(f"e2kd-fast train: {stop}", file=sys.stderr)
            print(f"e2kd-fast train: to go on: {shlex.join(again)}", file=sys.stderr)
        return stop.exit_code
    finally:
        from e2kd_fast.engine.process_group import shutdown_distributed

        shutdown_distributed()  # torchrun / deepspeed launches: leave the process group cleanly
    if trainer.strategy.is_main:
        print(json.dumps(summary, indent=2))
    return 0


def _eval(args: argparse.Namespace) -> int:
    import torch

    from e2kd_fast.config import load_config
    from e2kd_fast.data.build import build_datasets
    from e2kd_fast.data.loaders import make_loader
    from e2kd_fast.engine import evaluate
    from e2kd_fast.engine.builders import build_student, build_teacher, check_model_settings, resolve_device
    from e2kd_fast.models import load_checkpoint

    cfg = load_config(args.config, args.overrides)
    check_model_settings(cfg)
    data = build_datasets(cfg, train=False)
    device = resolve_device(cfg.train.device)
    student = build_student(cfg)
    load_checkpoint(student, args.checkpoint)
    teacher = build_teacher(cfg)
    loader = make_loader(
        data.val,
        data.val_indices if data.val_indices is not None else torch.arange(len(data.val)),
        batch_size=cfg.data.eval_batch_size or cfg.data.batch_size,
        num_workers=cfg.data.num_workers,
    )
    metrics = evaluate(
        student.to(device),
        loader,
        teacher=None if teacher is None else teacher.to(device),
        explanation=cfg.distill.explanation if teacher is not None else None,
        device=device,
    )
    print(json.dumps(metrics, indent=2))
    return 0


def _explain(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from PIL import Image

    from e2kd_fast.data.folders import read_image
    from e2kd_fast.data.transforms import eval_transform
    from e2kd_fast.explain import contribution_map, dynamic_weights, explanation_to_rgba, gradcam
    from e2kd_fast.models import create_model, load_checkpoint, model_entry

    family = model_entry(args.model).family
    model = create_model(args.model, num_classes=args.num_classes)
    if args.checkpoint is not None:
        load_checkpoint(model, args.checkpoint)
    model.eval()
    transform = eval_transform(args.image_size, args.resize, encoding="bcos" if family == "bcos" else "standard")
    plain = eval_transform(args.image_size, args.resize, encoding="none")
    args.out.mkdir(parents=True, exist_ok=True)
    for path in args.images:
        if not path.is_file():
            raise FileNotFoundError(f"image not found: {path}")
        image = read_image(path)  # 16-bit, gray, palette and alpha images read as in training
        x = transform(image)[None]
        target = None if args.target is None else torch.tensor([args.target])
        if family == "bcos":
            weights, logits = dynamic_weights(model, x, target, return_logits=True)
            picture = explanation_to_rgba(x[0], weights[0])
            rgb = picture[..., :3] * picture[..., 3:]
            contributions = contribution_map(x, weights)[0]
            np.save(args.out / f"{path.stem}_contributions.npy", contributions.detach().numpy())
        else:
            cam, logits = gradcam(model, x, target, return_logits=True)
            heat = (cam[0, 0] / cam.max().clamp_min(1e-12)).detach().numpy()
            rgb = 0.5 * plain(image).permute(1, 2, 0).numpy() + 0.5 * np.stack([heat, 0 * heat, 1 - heat], -1)
        explained = int(logits.argmax(1)) if target is None else int(target)
        side_by_side = np.concatenate([plain(image).permute(1, 2, 0).numpy(), rgb], axis=1)
        out_path = args.out / f"{path.stem}_class{explained}.png"
        Image.fromarray((side_by_side.clip(0, 1) * 255).round().astype(np.uint8)).save(out_path)
        print(f"{path} -> {out_path} (class {explained}, logit {float(logits[0, explained].detach()):.3f})")
    return 0


def _precompute(args: argparse.Namespace) -> int:
    from e2kd_fast.config import load_config
    from e2kd_fast.engine.builders import check_model_settings
    from e2kd_fast.engine.precompute import precompute

    cfg = load_config(args.config, args.overrides)
    check_model_settings(cfg)
    # Rank and world size from torchrun (RANK / WORLD_SIZE): each rank writes its own shards.
    precompute(
        cfg,
        show_progress=not args.no_progress,
        shard_size=args.shard_size,
        map_dtype=args.map_dtype,
        map_scale=args.map_scale,
        max_shards=args.max_shards,
        report_fidelity=args.report_fidelity,
    )  # logs what it wrote and what the store now holds
    return 0


def _demo(args: argparse.Namespace) -> int:
    from e2kd_fast.demo import main as demo_main

    flags = [flag for flag, on in (("--quick", args.quick), ("--no-progress", args.no_progress)) if on]
    demo_main(["--out", str(args.out), *flags])
    return 0


def _report(args: argparse.Namespace) -> int:
    from e2kd_fast.report import make_report

    result = make_report(
        args.runs,
        args.out,
        images=args.images,
        checkpoint=args.checkpoint,
        split=args.split,
        max_eval=args.max_eval,
        device=args.device,
        unicam=args.unicam,
    )
    print(f"report: {result['html']}" + (f" and {result['markdown']}" if result["markdown"] else ""))
    return 0


def _xdistill(args: argparse.Namespace) -> int:
    from e2kd_fast.xdistill.run import run

    print(json.dumps(run(args.config, args.out), indent=2))
    return 0


_COMMANDS = {
    "train": _train,
    "eval": _eval,
    "explain": _explain,
    "precompute": _precompute,
    "demo": _demo,
    "report": _report,
    "xdistill": _xdistill,
}

if __name__ == "__main__":
    sys.exit(main())
