"""The ``e2kd-fast`` command line (also ``python -m e2kd_fast``).

e2kd-fast train --config configs/x.yaml [--set optim.lr=3e-4 ...] [--resume auto|PATH [--resume-force]]
                [--overwrite] [--print-config] [--dry-run]
e2kd-fast eval --checkpoint runs/x/checkpoints/last.pt [--config configs/x.yaml] [--no-ema]
e2kd-fast explain --checkpoint ckpt.pt --out explanations/ img1.jpg img2.png [--no-ema]
e2kd-fast export runs/x/checkpoints/last.pt --out student.pt [--no-ema]
e2kd-fast precompute --config configs/x_frozen.yaml
e2kd-fast demo [--out runs/demo]
e2kd-fast report runs/kd runs/e2kd --out reports/x [--images 4]
e2kd-fast xdistill configs/xdistill/synthetic.yaml --out runs/xdistill

eval, explain and export take a checkpoint's averaged weights (``train.ema_decay``) when it holds
them, and say so; ``--no-ema`` takes the raw student's weights instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from e2kd_fast import __version__

# Only the standard library and the package's lazy root here: parsing arguments imports no torch, so
# --help, --version and argument errors answer at once; each command imports what it runs.
if TYPE_CHECKING:  # annotations only
    from e2kd_fast.config import Config
    from e2kd_fast.engine import Trainer
    from e2kd_fast.models import ModelSpec


def _add_config_args(parser: argparse.ArgumentParser, required: bool = True, what: str = "") -> None:
    parser.add_argument("--config", required=required, type=Path, help="YAML configuration file" + what)
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value with a dotted key, e.g. --set optim.lr=3e-4 (repeatable)",
    )


def _add_model_args(parser: argparse.ArgumentParser, fallback: bool) -> None:
    """The model a checkpoint holds, for files that do not say it (plain state dicts); they override the file.
    With ``fallback`` image sizes the file does not know default to 224 / 256."""
    size, resize = (", else 224", ", else size × 8/7") if fallback else ("", "")
    parser.add_argument("--model", default=None, help="registered model name (default: the checkpoint's)")
    parser.add_argument(
        "--num-classes", type=int, default=None, help="outputs of the model (default: the checkpoint's)"
    )
    parser.add_argument(
        "--image-size", type=int, default=None, help=f"centre crop size (default: the checkpoint's{size})"
    )
    parser.add_argument(
        "--resize", type=int, default=None, help=f"resize before cropping (default: the checkpoint's{resize})"
    )


def _add_ema_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-ema",
        dest="use_ema",
        action="store_false",
        help="a checkpoint of a run with train.ema_decay: its raw weights, not the averaged ones (the default)",
    )


def _say_which_weights(source: object, payload: object, use_ema: bool) -> None:
    """One line on stderr when a checkpoint holds averaged weights: which of its two sets is used."""
    from e2kd_fast.models import has_ema_weights

    if has_ema_weights(payload):
        which = "the EMA (averaged) weights" if use_ema else "the raw weights (--no-ema)"
        print(f"e2kd-fast: {source} holds EMA weights; using {which}", file=sys.stderr)


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
        "--overwrite",
        action="store_true",
        help="start over in a train.out_dir that holds an earlier run: its checkpoints, logs and summary are "
        "deleted first (without it, and without --resume, such a start is refused)",
    )
    train.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar; the log lines (one per epoch, compiles, evaluations, checkpoints) still go to "
        "stderr and <out_dir>/train.log",
    )
    train.add_argument("--print-config", action="store_true", help="print the merged config as YAML and exit")
    train.add_argument(
        "--dry-run",
        action="store_true",
        help="check the config, build the data and models, print a summary and exit without training",
    )

    evaluate = commands.add_parser("eval", help="evaluate a checkpoint on its run's (or a config's) validation data")
    _add_config_args(evaluate, required=False, what=" (default: the run config stored in the checkpoint)")
    evaluate.add_argument("--checkpoint", required=True, type=Path, help="student checkpoint to evaluate")
    _add_ema_arg(evaluate)

    explain = commands.add_parser(
        "explain", help="write PNG explanations of images for a model and one labelled grid of them"
    )
    explain.add_argument("images", nargs="+", type=Path, help="image files")
    explain.add_argument("--checkpoint", type=Path, default=None, help="weights to load (default: random init)")
    _add_model_args(explain, fallback=True)
    _add_ema_arg(explain)
    explain.add_argument("--target", type=int, default=None, help="class to explain (default: the top-1)")
    explain.add_argument("--out", type=Path, default=Path("explanations"), help="output folder")
    explain.add_argument(
        "--class-names",
        default=None,
        help="class names for the labelled grid: a text file (one per line) or a comma-separated list",
    )

    export = commands.add_parser(
        "export", help="write a student's weights with its architecture, classes and input (no optimiser state)"
    )
    export.add_argument("checkpoint", type=Path, help="a checkpoint, or a run folder (its checkpoints/last.pt)")
    export.add_argument("--out", required=True, type=Path, help="the file to write, e.g. student.pt")
    _add_model_args(export, fallback=False)
    _add_ema_arg(export)

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
    demo.add_argument(
        "--quick", action="store_true", help="a tiny run that checks the pipeline (about 15 s on 2 CPU cores)"
    )
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
    from e2kd_fast.config import config_to_dict, load_config
    from e2kd_fast.engine.builders import check_model_settings
    from e2kd_fast.engine.run_folder import with_run_dir

    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        import yaml

        print(
            yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False, allow_unicode=True), end=""
        )
        return 0
    chosen_dir = cfg.train.out_dir is None
    if chosen_dir and args.resume == "auto":
        raise ValueError(
            "--resume auto needs train.out_dir: without it each run gets a new folder, so there is nothing to go on "
            "from; add --set train.out_dir=<the run's folder>"
        )
    resumed_dir = None
    if chosen_dir and args.resume is not None:
        resumed_dir = _run_folder_of(Path(args.resume))
        chosen_dir = False
    cfg = with_run_dir(cfg, args.config, out_dir=resumed_dir)
    check_model_settings(cfg)  # model names and arguments, before any data is read
    if args.dry_run:
        return _dry_run(cfg, args)
    from e2kd_fast.engine import TrainingInterrupted

    if chosen_dir and os.environ.get("RANK", "0") == "0":
        print(f"e2kd-fast train: run folder {cfg.train.out_dir}", file=sys.stderr)
    trainer = _build_trainer(cfg, show_progress=not args.no_progress)
    try:
        summary = trainer.fit(resume=args.resume, resume_force=args.resume_force, overwrite=args.overwrite)
    except TrainingInterrupted as stop:
        # SIGTERM / SIGINT: last.pt holds the finished step; the status is the signal's (143, 130).
        if trainer.strategy.is_main:
            again = ["e2kd-fast", "train", "--config", str(args.config)]
            overrides = [*args.overrides, *([f"train.out_dir={cfg.train.out_dir}"] if chosen_dir else [])]
            again += [part for item in overrides for part in ("--set", item)] + ["--resume", "auto"]
            print(f"e2kd-fast train: {stop}", file=sys.stderr)
            print(f"e2kd-fast train: to go on: {shlex.join(again)}", file=sys.stderr)
        return stop.exit_code
    finally:
        from e2kd_fast.engine.process_group import shutdown_distributed

        shutdown_distributed()  # torchrun / deepspeed launches: leave the process group cleanly
    if trainer.strategy.is_main:
        print(json.dumps(summary, indent=2))
    return 0


def _build_trainer(cfg: Config, show_progress: bool) -> Trainer:
    """The datasets and the Trainer that ``train`` runs and ``train --dry-run`` describes."""
    from e2kd_fast.data.build import build_datasets
    from e2kd_fast.engine import Trainer

    data = build_datasets(cfg)
    return Trainer(
        cfg,
        data.train,
        data.val,
        train_indices=data.train_indices,
        val_indices=data.val_indices,
        show_progress=show_progress,
    )


def _run_folder_of(checkpoint: Path) -> Path:
    """The run folder a checkpoint was written in (``<run>/checkpoints/<file>``), for --resume PATH."""
    if checkpoint.parent.name != "checkpoints":
        raise ValueError(
            f"--resume {checkpoint}: train.out_dir is not set and the file is not in a run's checkpoints/ folder; "
            "set train.out_dir (--set train.out_dir=...) to say where the resumed run writes"
        )
    return checkpoint.parent.parent


def _dry_run(cfg: Config, args: argparse.Namespace) -> int:
    """Builds what training would (data, models, optimiser, step) and prints its start-up summary;
    trains nothing and writes nothing."""
    from e2kd_fast.engine.run_folder import check_fresh_start

    run_dir = Path(cfg.train.out_dir)
    if args.resume is None and not args.overwrite:
        check_fresh_start(run_dir)  # the error training would stop with
    try:
        trainer = _build_trainer(cfg, show_progress=False)
    finally:
        from e2kd_fast.engine.process_group import shutdown_distributed

        shutdown_distributed()  # a multi-process launch built its process group: leave it cleanly
    overrides = f" with {len(args.overrides)} --set" if args.overrides else ""
    start = f"resumes {args.resume}" if args.resume is not None else ("exists" if run_dir.exists() else "to be created")
    print("e2kd-fast train --dry-run: the config is valid; nothing was trained or written")
    print(f"  config: {args.config}{overrides}")
    for line in trainer.start_summary():
        print(f"  {line}")
    print(f"  run folder: {start}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    import torch

    from e2kd_fast.config import apply_overrides, config_from_dict, load_config
    from e2kd_fast.data.build import build_datasets
    from e2kd_fast.data.loaders import make_loader
    from e2kd_fast.engine import evaluate
    from e2kd_fast.engine.builders import build_teacher, check_model_settings, resolve_device
    from e2kd_fast.models import ModelSpec, create_model, load_checkpoint, read_checkpoint

    payload = read_checkpoint(args.checkpoint)
    spec = ModelSpec.from_checkpoint(payload)
    if args.config is not None:
        cfg = load_config(args.config, args.overrides)
        if spec is not None:
            _check_student_matches(cfg, spec, args.checkpoint, args.config)
    else:
        stored = payload.get("config") if isinstance(payload, dict) else None
        if not isinstance(stored, dict):
            raise ValueError(
                f"{args.checkpoint} holds no run config (an exported model or a plain state dict): "
                "pass --config for the data to evaluate on"
            )
        cfg = config_from_dict(apply_overrides(stored, args.overrides))
    check_model_settings(cfg)
    data = build_datasets(cfg, train=False)
    device = resolve_device(cfg.train.device)
    student = create_model(cfg.student.name, num_classes=cfg.student.num_classes, **dict(cfg.student.kwargs))
    load_checkpoint(student, payload, use_ema=args.use_ema)
    _say_which_weights(args.checkpoint, payload, args.use_ema)
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


def _check_student_matches(cfg: Config, spec: ModelSpec, checkpoint: Path, config: Path) -> None:
    """A config whose student differs from the checkpoint's model is an error; other image sizes a warning."""
    from e2kd_fast.models import ModelSpec

    wanted = ModelSpec.build(cfg.student.name, cfg.student.num_classes, cfg.student.kwargs)
    for key, mine, theirs in (
        ("name", wanted.name, spec.name),
        ("num_classes", wanted.num_classes, spec.num_classes),
        ("kwargs", dict(wanted.kwargs), dict(spec.kwargs)),
    ):
        if mine != theirs:
            raise ValueError(
                f"{config}: student.{key} is {mine!r} but {checkpoint} holds a model with {key} {theirs!r}; "
                "leave out --config to evaluate with the checkpoint's own run config"
            )
    for key, mine, theirs in (
        ("image_size", cfg.data.image_size, spec.image_size),
        ("eval_resize", cfg.data.eval_resize, spec.eval_resize),
    ):
        if theirs is not None and mine != theirs:
            _warn(f"data.{key} is {mine} in {config}, the model was trained with {theirs}")


def _warn(message: str) -> None:
    print(f"e2kd-fast: warning: {message}", file=sys.stderr)


def _resolve_model(args: argparse.Namespace, payload: object, source: object, fill_sizes: bool = True) -> ModelSpec:
    """The model spec from the checkpoint, with the command's --model, --num-classes, --image-size and
    --resize over it; a --model or --num-classes that contradicts the file is an error. With
    ``fill_sizes`` image sizes the file does not know are the usual 224 / 256, with a warning."""
    from e2kd_fast.models import ModelSpec

    stored = None if payload is None else ModelSpec.from_checkpoint(payload)
    if stored is not None:
        for flag, given, known in (
            ("--model", args.model, stored.name),
            ("--num-classes", args.num_classes, stored.num_classes),
        ):
            if given is not None and given != known:
                raise ValueError(f"{flag} {given} contradicts {source}, which holds a model with {known}")
    if stored is None and args.model is None:
        where = f"{source} does not say which model it holds" if payload is not None else "no --checkpoint given"
        raise ValueError(f"--model is needed: {where} (see e2kd_fast.models.list_models())")
    spec = stored or ModelSpec.build(args.model, args.num_classes)
    if stored is not None and args.image_size is not None and stored.image_size not in (None, args.image_size):
        _warn(f"--image-size {args.image_size}: the model was trained at {stored.image_size}")
    image_size = args.image_size or spec.image_size
    if image_size is None and not fill_sizes:
        return dataclasses.replace(spec, eval_resize=args.resize or spec.eval_resize)
    if image_size is None:
        if payload is not None:
            _warn(f"{source} does not say its image size: using 224 (set --image-size and --resize)")
        image_size = 224
    resize = args.resize or (spec.eval_resize if image_size == spec.image_size else None)
    resize = resize or round(image_size * 8 / 7)  # 224 → 256, the usual evaluation ratio
    return dataclasses.replace(spec, image_size=image_size, eval_resize=resize)


def _explain(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from PIL import Image

    from e2kd_fast.data.folders import read_image
    from e2kd_fast.data.transforms import eval_transform
    from e2kd_fast.explain import contribution_map, dynamic_weights, gradcam
    from e2kd_fast.models import build_model, load_checkpoint, read_checkpoint
    from e2kd_fast.report.plots import explain_grids, explanation_picture

    payload = None if args.checkpoint is None else read_checkpoint(args.checkpoint)
    spec = _resolve_model(args, payload, args.checkpoint)
    model = build_model(spec)
    if payload is not None:
        load_checkpoint(model, payload, use_ema=args.use_ema)
        _say_which_weights(args.checkpoint, payload, args.use_ema)
    model.eval()
    transform = eval_transform(spec.image_size, spec.eval_resize, encoding=spec.encoding)
    plain = eval_transform(spec.image_size, spec.eval_resize, encoding="none")
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for path in args.images:
        if not path.is_file():
            raise FileNotFoundError(f"image not found: {path}")
        image = read_image(path)  # 16-bit, gray, palette and alpha images read as in training
        x = transform(image)[None]
        target = None if args.target is None else torch.tensor([args.target])
        if spec.encoding == "bcos":
            explanation, logits = dynamic_weights(model, x, target, return_logits=True)
            contributions = contribution_map(x, explanation)[0]
            np.save(args.out / f"{path.stem}_contributions.npy", contributions.detach().numpy())
        else:
            explanation, logits = gradcam(model, x, target, return_logits=True)
        shown = plain(image)
        rgb = explanation_picture(x[0], explanation[0])
        explained = int(logits.argmax(1)) if target is None else int(target)
        side_by_side = np.concatenate([shown.permute(1, 2, 0).numpy(), rgb], axis=1)
        out_path = args.out / f"{path.stem}_class{explained}.png"
        Image.fromarray((side_by_side.clip(0, 1) * 255).round().astype(np.uint8)).save(out_path)
        name = f" {spec.classes[explained]!r}" if spec.classes and explained < len(spec.classes) else ""
        logit = float(logits[0, explained].detach())
        print(f"{path} -> {out_path} (class {explained}{name}, logit {logit:.3f})")
        probabilities = torch.softmax(logits[0].detach().float(), 0)
        rows.append((path.name, shown.permute(1, 2, 0).numpy(), rgb, probabilities, explained))
    names = _class_names(args.class_names) or (list(spec.classes) if spec.classes else None)
    for grid_path in explain_grids(rows, args.out, names, gradcam=spec.encoding != "bcos"):
        print(f"labelled grid: {grid_path}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from e2kd_fast.models import export_model, has_ema_weights, read_checkpoint

    source = args.checkpoint / "checkpoints" / "last.pt" if args.checkpoint.is_dir() else args.checkpoint
    payload = read_checkpoint(source)
    spec = _resolve_model(args, payload, source, fill_sizes=False)
    path, spec = export_model(source, args.out, spec, use_ema=args.use_ema)
    size = f"{path.stat().st_size / 2**20:.1f} MiB (from {source.stat().st_size / 2**20:.1f} MiB)"
    classes = f"{len(spec.classes)} named classes" if spec.classes else f"{spec.num_classes} classes (no names)"
    sizes = f"at {spec.image_size} px (resize {spec.eval_resize})" if spec.image_size else "(image size unknown)"
    weights = ""
    if has_ema_weights(payload):
        weights = "; the EMA (averaged) weights" if args.use_ema else "; the raw weights (--no-ema), not the EMA"
    print(f"{source} -> {path}: {spec.name}, {classes}, {spec.encoding} input {sizes}{weights}; {size}")
    return 0


def _class_names(value: str | None) -> list[str] | None:
    """``--class-names``: a text file with one name per line, or a comma-separated list."""
    if value is None:
        return None
    path = Path(value)
    if path.is_file():
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [name.strip() for name in value.split(",")]


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
    "export": _export,
    "precompute": _precompute,
    "demo": _demo,
    "report": _report,
    "xdistill": _xdistill,
}

if __name__ == "__main__":
    sys.exit(main())
