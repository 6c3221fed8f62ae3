"""The `bpl` command: train, compress, evaluate, predict, profile, export, demo, cache."""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .config import (
    CACHE_MODES,
    COMMAND_DEFAULTS,
    PLACEMENTS,
    RECIPES,
    SCHEDULES,
    SELECT,
    Config,
    resolve_command,
)
from .diversity import COMPARISONS, GRANULARITIES
from .errors import NOTHING, BPLError, wording
from .exporting import CALIBRATION_IMAGES, INT8_MAX_DROP, INT8_RANGES, MIN_CALIBRATION_IMAGES
from .partners import INITS, PARTNER_KINDS
from .pruning import LEVELS, SOFT_PARTNERS, importance_names
from .pruning.latency import RUNTIMES

log = logging.getLogger("bpl")
S = argparse.SUPPRESS

EXAMPLES = {
    "train": "bpl train --data ucm --data-root ../shared/data/ucmerced --arch resnet18 "
             "--image-size 112 --epochs 30 --out runs/ucm-r18",
    "compress": "bpl compress --baseline runs/ucm-r18/best.pt --data ucm --data-root "
                "../shared/data/ucmerced --image-size 112 --flops-reduction 0.74 "
                "--out runs/ucm-r18-bpl",
    "evaluate": "bpl evaluate runs/ucm-r18-bpl/deploy.pt --data-root ../shared/data/ucmerced",
    "profile": "bpl profile runs/ucm-r18/best.pt runs/ucm-r18-bpl/deploy.pt --batch-size 1 16",
    "demo": "bpl demo --out runs/demo",
    "predict": "bpl predict runs/ucm-r18-bpl/deploy.pt photos/ --top-k 3",
    "export": "bpl export runs/ucm-r18-bpl/deploy.pt --format onnx --out deploy.onnx\n"
              "  bpl export runs/ucm-r18-bpl/deploy.pt --int8   # deploy.int8.onnx, calibrated "
              "on the run's training images",
    "cache": "bpl cache ls; bpl cache clear --data ucm",
}


_DEFAULTS = Config()


def _flag(group, name: str, command: str | None = None, **kw: Any) -> None:
    """A config flag: unset unless given (so a --config file can fill it); --help shows
    the default (``command``'s own where it has one). A yes/no flag gets its --no-... switch
    too."""
    dest = name.replace("-", "_")
    default = COMMAND_DEFAULTS.get(command or "", {}).get(dest, getattr(_DEFAULTS, dest, None))
    if kw.get("action") == "store_true":
        kw["action"] = argparse.BooleanOptionalAction
    elif default is not None and default != []:
        shown = " ".join(map(str, default)) if isinstance(default, list) else default
        shown = f"{shown:.4g}" if isinstance(shown, float) else shown
        kw["help"] = f"{kw.get('help', '')} (default: {shown})".lstrip()
    group.add_argument(f"--{name}", dest=dest, default=S, **kw)


def _data_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    _flag(g, "data", help="dataset: ucm, nwpu-resisc45, rsd46-whu, eurosat, imagefolder, digits")
    _flag(g, "data-root", metavar="DIR", help="folder of class sub-folders (or train/ + val/)")
    _flag(g, "image-size", type=int, metavar="PX", help="training and evaluation image size")
    _flag(g, "train-ratio", type=float, help="per-class train share of an unsplit dataset")
    _flag(g, "val-ratio", type=float, metavar="R",
          help="per-class share of the training split kept for validation, which chooses the "
               "epoch (default 0.1; 0: none, keep the last epoch)")
    _flag(g, "train-subset", type=float, metavar="R",
          help="train on this per-class fraction of the training split (fixed by --seed)")
    _flag(g, "cache", choices=CACHE_MODES,
          help="decoded images: auto (in memory within --cache-budget, read from disk beyond), "
               "memory, mmap (read from the cache file on disk), off (decode every image when "
               "read)")
    _flag(g, "cache-dir", metavar="DIR",
          help="where decoded images are kept across runs (default: $BPL_CACHE_DIR or "
               "~/.cache/bpl/images; `bpl cache ls` lists them)")
    _flag(g, "cache-budget", type=float, metavar="FRACTION",
          help="--cache auto: the share of the available memory the decoded images may take "
               "(one copy per torchrun process)")
    _flag(g, "skip-bad", action="store_true", help="skip unreadable images instead of failing")
    _flag(g, "download", action="store_true", help="download the dataset if it is missing (ucm)")


def _train_options(p: argparse.ArgumentParser, command: str) -> None:
    g = p.add_argument_group("training")
    _flag(g, "recipe", choices=sorted(RECIPES),
          help="named settings: the paper's 'reference'; recoveries after pruning: cosine, rewind "
               "(the baseline's learning rates replayed), onecycle, constant")
    _flag(g, "epochs", command, type=_epochs, metavar="N|auto",
          help="epochs to train (all of them, whatever the --schedule), or auto: until "
               "validation top-1 stops improving (cosine cycles of --cycle-epochs; --schedule "
               "plateau for the other rule; at most --max-epochs)")
    _flag(g, "max-epochs", type=int, metavar="N", help="the cap of --epochs auto")
    _flag(g, "batch-size", type=int)
    _flag(g, "lr", type=float, help="peak learning rate")
    _flag(g, "momentum", type=float)
    _flag(g, "nesterov", action="store_true")
    _flag(g, "weight-decay", type=float)
    _flag(g, "schedule", choices=SCHEDULES)
    _flag(g, "milestones", type=float, nargs="+", metavar="FRACTION",
          help="step schedule: fractions of training where lr is multiplied by --gamma")
    _flag(g, "gamma", type=float)
    _flag(g, "warmup-epochs", type=int)
    _flag(g, "patience", type=int, metavar="N",
          help="plateau schedule (--epochs auto --schedule plateau): epochs without a validation gain before the "
               "learning rate is multiplied by --gamma")
    _flag(g, "min-gain", type=float, metavar="POINTS",
          help="plateau and cycles schedules: validation top-1 points that count as a gain")
    _flag(g, "decays", type=int, metavar="N",
          help="plateau schedule: learning-rate decays before the next plateau ends training")
    _flag(g, "cycle-epochs", type=int, metavar="N",
          help="cycles schedule (--epochs auto's default): the length of each cosine "
               "cycle; under --epochs auto training ends after a cycle that adds no more "
               "than --min-gain (with a number of --epochs the cycles run them all)")
    _flag(g, "label-smoothing", type=float)
    g = p.add_argument_group("execution")
    _flag(g, "device", help="auto, cpu, cuda, cuda:1 ...")
    g.add_argument("--no-amp", dest="amp", action="store_false", default=S,
                   help="train in float32 on CUDA too (float16 autocast by default there)")
    g.add_argument("--cpu-bf16", dest="cpu_bf16", action="store_true", default=S,
                   help="on a CPU with AMX, train in bfloat16 with channels_last: 1.5-3.7x "
                        "faster; off by default, as bpl's paired check moved test top-1 beyond "
                        "its interval in 2 of 8 cells (docs/results.md)")
    g.add_argument("--no-channels-last", dest="channels_last", action="store_false", default=S,
                   help="keep tensors NCHW where mixed precision would use channels_last")
    _flag(g, "workers", type=int, help="DataLoader worker processes")
    _flag(g, "sync-bn", action="store_true", help="under torchrun: BatchNorm statistics over all processes")
    _flag(g, "compile", action="store_true",
          help="torch.compile the model for training (off by default; on the CPU it needs a C++ "
               "compiler, on CUDA Triton)")
    _flag(g, "select", choices=SELECT,
          help="which epoch to keep: the best on the validation split (default), the best of "
               "those at an annealed learning rate (at most 0.1 of the peak: a schedule's tail, "
               "each cycle's end), or the last")
    _flag(g, "seed", type=int)
    _flag(g, "out", metavar="DIR", help="run directory")
    _flag(g, "resume", action="store_true", help="continue the run in --out from its last.pt")
    g.add_argument("--no-latency", dest="latency", action="store_false", default=S,
                   help="skip CPU latency measurement in the report")


def _compress_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("compression")
    _flag(g, "baseline", metavar="CKPT",
          help="checkpoint written by bpl train (best.pt: the epoch validation chose), or a "
               "plain state_dict / whole torchvision or timm model file with --arch")
    _flag(g, "arch", help="architecture of a --baseline that is not a bpl checkpoint "
                          "(a torchvision name, or timm/NAME with the timm extra)")
    _flag(g, "flops-reduction", type=float, metavar="R",
          help="fraction of FLOPs to remove, counted as MACs, e.g. 0.74 (this, --max-drop or "
               "--speedup)")
    _flag(g, "max-drop", type=float, metavar="POINTS",
          help="instead of --flops-reduction: prune in steps ("
               + ", ".join(f"{100 * level:.0f}%%" for level in LEVELS)
               + " fewer MACs), recovering each for --epochs, and keep the smallest model "
               "within POINTS of the baseline's validation top-1; every step is kept in "
               "steps/K/ of the run")
    _flag(g, "speedup", type=float, metavar="S",
          help="instead of --flops-reduction: prune until the deployed model (BN folded) runs "
               "S times faster than the baseline, measured on this machine in --runtime "
               "(interleaved, medians); the cuts go where a per-layer latency table, measured "
               "once and cached beside the image caches, says the time is")
    _flag(g, "runtime", choices=list(RUNTIMES),
          help="--speedup: onnxruntime (the ONNX export, as `bpl export` writes it) or torch "
               "(the channels_last deploy form `bpl predict` runs)")
    _flag(g, "latency-batch", type=int, metavar="B",
          help="--speedup: the batch size the speed is measured at (--batch-size is training's)")
    _flag(g, "latency-threads", type=int, metavar="N",
          help="--speedup: CPU threads of the measurement (default: all torch uses)")
    _flag(g, "prune-steps", type=int, metavar="N",
          help="reach --flops-reduction in N cuts, each keeping the same share of the MACs "
               "and each recovered for --epochs (iterative pruning); every step is kept in "
               "steps/K/ of the run")
    _flag(g, "soft", action="store_true",
          help="the reference code's soft schedule instead of pruning first")
    _flag(g, "soft-every", type=int, metavar="N", help="soft schedule: re-pick filters every N epochs")
    _flag(g, "soft-partners", choices=list(SOFT_PARTNERS),
          help="soft schedule: regrow (the reference code: a partner's zeroed filters train "
               "again until the next re-pick) or masked (held at zero like the block's)")
    _flag(g, "from-scratch", action="store_true",
          help="train the pruned architecture from fresh weights instead of the baseline's")
    _flag(g, "importance", choices=importance_names(),
          help="channel criterion (l2, the paper's filter norm, by default), for hard and "
               "soft pruning alike")
    _flag(g, "global-pruning", action="store_true",
          help="rank channels across all layers instead of the same ratio in each")
    _flag(g, "accept-closest", action="store_true",
          help="when --flops-reduction (or --speedup) cannot be reached, keep the closest "
               "reachable one instead of stopping with an error")
    _flag(g, "round-to", type=int, metavar="N",
          help="keep pruned channel counts multiples of N, which CPU kernels run much faster "
               "(default 8; 1: no rounding)")
    _flag(g, "partner", choices=list(PARTNER_KINDS),
          help="the partner's structure: same (the paper's: a conv of the block's shape with "
               "its BN), diverse (1x1, 1x1->KxK and 1x1->avg-pool branches, each with a BN) or "
               "asymmetric (1xK and Kx1 branches, each with a BN)")
    _flag(g, "init", choices=INITS,
          help="how partners start: preserve (partner BN scale 0; exact), split (a copy of the "
               "block, BN scales split 1-share/share; exact, trains at once), paper (the "
               "reference code's; changes the output)")
    _flag(g, "partner-share", type=float, metavar="S",
          help="--init split: the partner's share of the block (default 1/3)")
    _flag(g, "placement", choices=sorted(PLACEMENTS),
          help="which convs get partners: paper (3x3 and 5x5) or all (1x1 and 7x7 too); with "
               "--soft --no-partners, which convs' channels the soft schedule prunes")
    _flag(g, "diversity-weight", type=float, metavar="W",
          help="weight of the diversity loss, cos(block, partner) + 1, per group (0.01, the "
               "paper's; 0 turns it off)")
    _flag(g, "granularity", choices=list(GRANULARITIES),
          help="what one diversity term covers: a network stage (the paper), a block, or all")
    _flag(g, "diversity-compare", choices=list(COMPARISONS),
          help="what the diversity loss compares: raw kernels (the paper) or functional ones "
               "(BN-folded: a sign flip undone by a BN no longer counts as diversity)")
    g.add_argument("--no-partners", dest="partners", action="store_false", default=S,
                   help="plain fine-tuning of the pruned model: bpl's recovery study found no "
                        "difference from partners in accuracy (docs/results.md), and a "
                        "step is 1.1-1.9x faster than with same partners (2-5x faster than "
                        "with diverse or asymmetric ones)")
    _flag(g, "distill", action="store_true",
          help="also distil the unpruned baseline's predictions into the compressed model")
    _flag(g, "distill-temperature", type=float, metavar="T", help="softmax temperature (4)")
    _flag(g, "distill-weight", type=float, metavar="W",
          help="weight of the distillation term added to the cross-entropy (1)")
    _flag(g, "verify-tol", type=float, help="largest relative error accepted by the checks")


def _epochs(text: str) -> int | str:
    """``--epochs``: a whole number, or ``auto``."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or auto, got {text!r}") from None


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML or JSON file of options; flags win")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bpl",
        description="Compress CNNs with Block-wise Partner Learning (Zhang et al., TNNLS 2023).",
        epilog="Start with `bpl demo`. Every command has --help with an example.",
    )
    parser.add_argument("--version", action="version", version=f"bpl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name, help=help, description=help, epilog=f"example:\n  {EXAMPLES[name]}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    p = command("train", "train a baseline classifier on a dataset")
    _data_options(p)
    g = p.add_argument_group("model")
    _flag(g, "arch", help="torchvision architecture name (resnet18, resnet50, vgg16_bn, ...)")
    _flag(g, "weights", metavar="PATH", help="start from these weights (a state_dict or bpl file)")
    _flag(g, "pretrained", action="store_true", help="start from torchvision's ImageNet weights")
    _train_options(p, "train")
    _common(p)

    p = command("compress", "prune a baseline, fine-tune it (with partners unless "
                            "--no-partners), fuse and verify")
    _data_options(p)
    _compress_options(p)
    _train_options(p, "compress")
    _common(p)

    p = command("evaluate", "top-1/top-5 and per-class accuracy of a checkpoint")
    p.add_argument("checkpoint", help="any checkpoint bpl wrote (last.pt, best.pt, deploy.pt)")
    _data_options(p)
    p.add_argument("--split", metavar="JSON", help="split file (default: split.json beside the checkpoint)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    _common(p)

    p = command("predict", "the top classes of images, from a deploy.pt or an exported .onnx")
    p.add_argument("model", help="a checkpoint bpl wrote (deploy.pt) or an ONNX file from bpl export")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER", help="images, or folders of them")
    p.add_argument("--top-k", type=int, default=5, help="classes shown per image (default: 5)")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch (default: 32)")
    p.add_argument("--json", action="store_true", help="print the predictions as JSON")
    _common(p)

    p = command("profile", "MACs, params and CPU latency of one or two checkpoints")
    p.add_argument("checkpoints", nargs="+", metavar="checkpoint", help="one, or baseline and compressed")
    p.add_argument("--image-size", type=int, help="input size (default: the checkpoint's)")
    p.add_argument("--batch-size", type=int, nargs="+", default=[1, 16])
    p.add_argument("--threads", type=int, help="torch CPU threads (default: all)")
    p.add_argument("--repeats", type=int, default=20, help="timed runs per model (median)")
    p.add_argument("--no-onnx", dest="onnx", action="store_false",
                   help="time PyTorch eager only, not onnxruntime")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    _common(p)

    p = command("export", "export a checkpoint to ONNX or TorchScript and check parity")
    p.add_argument("checkpoint", help="any checkpoint bpl wrote; partners are fused first")
    p.add_argument("--format", choices=["onnx", "torchscript"], default="onnx")
    p.add_argument("--out", metavar="PATH", help="output file (default: beside the checkpoint)")
    p.add_argument("--image-size", type=int, help="input size (default: the checkpoint's)")
    p.add_argument("--verify-tol", "--tol", dest="verify_tol", type=float, default=1e-4,
                   help="largest relative error accepted against the checkpoint's model, as "
                        "compress's --verify-tol (--tol: its old name, until 0.3)")
    g = p.add_argument_group("INT8 (onnxruntime static quantization)")
    g.add_argument("--int8", action="store_true",
                   help="write an INT8 ONNX model (QDQ, per-channel int8 weights, uint8 "
                        "activations calibrated on your training images), checked against "
                        "fp32 on the run's validation split (default file: CHECKPOINT.int8.onnx)")
    g.add_argument("--calibration-data", metavar="DIR",
                   help="calibrate on images from this folder (searched recursively; your "
                        "training images, never the test split) instead of the run's "
                        "training split")
    g.add_argument("--calibration-images", type=int, metavar="N",
                   help=f"images to calibrate on, drawn at random (seed 0); fewer than "
                        f"{MIN_CALIBRATION_IMAGES} only when asked (default: "
                        f"{CALIBRATION_IMAGES})")
    g.add_argument("--int8-range", choices=INT8_RANGES,
                   help="the int8 weights' range: full, reduced to 7 bits (for x86 CPUs "
                        "without VNNI, where full-range products can saturate), or auto: "
                        "reduced when this is such a CPU (default)")
    g.add_argument("--max-drop", type=float, metavar="POINTS",
                   help="largest loss of validation top-1 against fp32 accepted; beyond it "
                        f"nothing is written (default: {INT8_MAX_DROP:g})")
    g.add_argument("--force", action="store_true",
                   help="write the INT8 model even beyond --max-drop, or with no validation "
                        "split to check it on")
    g.add_argument("--split", metavar="JSON",
                   help="the run's split file (default: split.json beside the checkpoint)")
    g.add_argument("--data", help="the run's dataset (default: the checkpoint's)")
    g.add_argument("--data-root", metavar="DIR",
                   help="where the run's images are (default: the checkpoint's)")
    g.add_argument("--cache-dir", metavar="DIR", help="keep decoded, resized images here")
    _common(p)

    p = command("cache", "list or delete the decoded-image caches (default folder: "
                         "$BPL_CACHE_DIR or ~/.cache/bpl/images)")
    p.add_argument("action", choices=["ls", "clear"],
                   help="ls: list them; clear: delete them (those being built are left)")
    p.add_argument("--cache-dir", metavar="DIR", help="another cache folder")
    p.add_argument("--data", metavar="NAME", help="clear: only this dataset's caches")
    p.add_argument("--json", action="store_true", help="ls: print the list as JSON")
    _common(p)

    p = command("demo", "the whole story on the bundled digits data in about two minutes")
    p.add_argument("--out", default="runs/demo", metavar="DIR")
    p.add_argument("--epochs", type=int, default=None, help="epochs per phase (default: the demo's)")
    _common(p)
    return parser


def _config(args: argparse.Namespace) -> Config:
    """The command's config from its flags and --config file (:func:`resolve_command`)."""
    skip = {"command", "config", "debug", "quiet"}
    overrides = {k: v for k, v in vars(args).items() if k not in skip}
    return resolve_command(args.command, overrides, args.config)


def _run_training(job, args: argparse.Namespace) -> int:
    """Run ``job`` (train or compress), under torchrun as one of several processes."""
    from . import distributed

    cfg = _config(args)
    ctx = distributed.init(cfg.device)
    try:
        metrics = job(cfg, progress=not args.quiet)
    finally:
        distributed.shutdown()
    if ctx.is_main:
        _print_summary(metrics)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .pipeline import train_baseline

    return _run_training(train_baseline, args)


def _cmd_compress(args: argparse.Namespace) -> int:
    from .pipeline import compress

    return _run_training(compress, args)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .pipeline import evaluate_checkpoint

    overrides = {k: v for k, v in vars(args).items()
                 if k in {"data", "data_root", "image_size", "cache", "cache_dir", "cache_budget",
                          "skip_bad"}}
    metrics = evaluate_checkpoint(args.checkpoint, split=args.split, batch_size=args.batch_size,
                                  device=args.device, overrides=overrides,
                                  progress=not args.quiet)
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        print(f"{args.checkpoint}: top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%  "
              f"({metrics['samples']} test images)")
        for name, acc in zip(metrics["classes"], metrics["per_class_top1"]):
            print(f"  {name:<24} {acc:6.2f}%")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from .predict import format_table, predict

    if args.top_k < 1 or args.batch_size < 1:
        raise BPLError("--top-k and --batch-size must be at least 1")
    results = predict(args.model, args.inputs, top_k=args.top_k, batch_size=args.batch_size,
                      progress=not args.quiet)
    print(json.dumps(results, indent=2) if args.json else format_table(results))
    return 0


def _cmd_profile(args: argparse.Namespace) -> int:
    from .pipeline import profile_checkpoints

    result = profile_checkpoints(args.checkpoints, image_size=args.image_size,
                                 batch_sizes=args.batch_size, threads=args.threads,
                                 repeats=args.repeats, onnx=args.onnx)
    print(json.dumps(result, indent=2) if args.json else result["table"])
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .pipeline import export_checkpoint

    int8_only = ("calibration_data", "calibration_images", "max_drop", "force", "split", "data",
                 "data_root", "cache_dir", "int8_range")
    given = [k for k in int8_only if getattr(args, k) not in (None, False)]
    if given and not args.int8:
        raise BPLError(f"--{given[0].replace('_', '-')} is an option of INT8 export: add --int8")
    overrides = {k: getattr(args, k) for k in ("data", "data_root", "cache_dir")
                 if getattr(args, k) is not None}
    max_drop = INT8_MAX_DROP if args.max_drop is None else args.max_drop
    result = export_checkpoint(
        args.checkpoint, format=args.format, out=args.out, image_size=args.image_size,
        verify_tol=args.verify_tol, int8=args.int8, calibration_data=args.calibration_data,
        calibration_images=(CALIBRATION_IMAGES if args.calibration_images is None
                            else args.calibration_images),
        max_drop=max_drop, force=args.force, split=args.split, overrides=overrides,
        progress=not args.quiet, int8_range=args.int8_range or "auto")
    print(f"wrote {result['path']} ({result['format']}, {result['precision']}); max relative "
          f"error of fp32 vs PyTorch {result['max_relative_error']:.2e} at batch sizes "
          f"{', '.join(map(str, result['errors_by_batch_size']))}")
    if args.int8:
        quant = result["quantization"]
        print(f"calibrated on {result['calibration']['source']}; weights at {quant['range']} "
              f"({quant['range_why']})")
        check = result["int8_check"]
        print("not checked against fp32 (--force without a validation split)" if check is None
              else f"validation top-1 on {check['images']} images: fp32 "
                   f"{check['fp32_top1']:.2f}%, INT8 {check['int8_top1']:.2f}% "
                   f"({check['int8_top1'] - check['fp32_top1']:+.2f} points; --max-drop {max_drop:g}"
                   f"{', not enforced: --force' if args.force else ''}), "
                   f"{check['agreement']:.2f}% same predictions")
    return 0


def _cmd_cache(args: argparse.Namespace) -> int:
    from .data import clear_caches, default_cache_dir, list_caches

    folder = Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir()
    if args.action == "ls":
        entries = list_caches(folder)
        if args.json:
            print(json.dumps([{**vars(e), "path": str(e.path)} for e in entries], indent=2))
        else:
            print(cache_table(folder, entries))
        return 0
    removed, busy = clear_caches(folder, args.data)
    for e in busy:
        print(f"left {e.path.name}: {e.holder or 'another process'} is building it")
    freed = sum(e.nbytes for e in removed)
    print(f"deleted {len(removed)} cache(s) from {folder}, {freed / 1e9:.2f} GB")
    return 0


def cache_table(folder: Path, entries: list) -> str:
    """``bpl cache ls``: one line per cache, then the total."""
    if not entries:
        return f"no image caches in {folder}"
    lines = [f"{folder}:", f"  {'dataset':<16} {'px':>4} {'images':>8} {'GB':>7}  "
                           f"{'state':<10} {'written':<16} file"]
    for e in entries:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.written))
        images = "?" if e.images is None else str(e.images)
        state = f"{e.state} ({e.holder})" if e.state == "building" else e.state
        lines.append(f"  {e.dataset:<16} {e.size:>4} {images:>8} {e.nbytes / 1e9:>7.2f}  "
                     f"{state:<10} {when:<16} {e.path.name}")
    total = sum(e.nbytes for e in entries)
    lines.append(f"  {len(entries)} cache(s), {total / 1e9:.2f} GB; `bpl cache clear` deletes them")
    return "\n".join(lines)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .pipeline import demo

    metrics = demo(args.out, epochs=args.epochs, progress=not args.quiet)
    _print_summary(metrics)
    return 0


def _print_summary(metrics: dict[str, Any]) -> None:
    from .report import comparison_table

    print(comparison_table(metrics["models"]))
    for key in ("fusion_error", "removal_error"):
        if metrics.get(key) is not None:
            print(f"{key.replace('_', ' ')}: {metrics[key]:.2e} (max relative)")
    run_dir = Path(metrics["config"]["out"]) if metrics.get("config", {}).get("out") else None
    if run_dir:
        print(f"run directory: {run_dir}  (report.md, metrics.json)")


COMMANDS = {
    "train": _cmd_train,
    "compress": _cmd_compress,
    "evaluate": _cmd_evaluate,
    "predict": _cmd_predict,
    "profile": _cmd_profile,
    "demo": _cmd_demo,
    "export": _cmd_export,
    "cache": _cmd_cache,
}


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (a scheduler's or `kill`'s stop) ends a command as Ctrl-C does: files being
    written are discarded whole and the user hears how to resume."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt
    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread (bpl.cli.main called from a worker thread)
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


#: Library parameters the command sets under another name (the rest share their flag's dest).
_PARAM_DEST = {"root": "data_root", "name": "data", "min_calibration": "calibration_images"}
#: Library parameter values the command says with a flag of its own.
_PARAM_WORDS = {("max_drop", None): "--force",
                ("validation", NOTHING): "--split with the run's split.json",
                ("num_classes", NOTHING): "the number of class folders"}


def flag_words(parser: argparse.ArgumentParser) -> Callable[[str, Any], str | None]:
    """How the command says a library parameter: the flag its own parser has for it
    (``accept_closest=True`` -> ``--accept-closest``, ``round_to=4`` -> ``--round-to 4``);
    None (Python's wording) for a parameter no flag sets."""
    flags: dict[str, argparse.Action] = {}
    parsers = [parser]
    while parsers:
        for action in parsers.pop()._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers += list(action.choices.values())
            elif any(o.startswith("--") for o in action.option_strings):
                flags.setdefault(action.dest, action)

    def words(name: str, value: Any) -> str | None:
        try:
            special = _PARAM_WORDS.get((name, value))
        except TypeError:  # an unhashable value
            special = None
        action = flags.get(_PARAM_DEST.get(name, name))
        if special is not None or action is None:
            return special
        long = [o for o in action.option_strings if o.startswith("--")]
        if value is NOTHING:
            return long[0]
        if isinstance(action, argparse.BooleanOptionalAction):  # --skip-bad / --no-skip-bad
            return long[0] if value else next(o for o in long if o.startswith("--no-"))
        if action.nargs == 0:  # a switch: its flag says the one value it sets
            return long[0] if value == action.const else None
        return f"{long[0]} {value:g}" if isinstance(value, float) else f"{long[0]} {value}"

    return words


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `bpl` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(message)s",
        stream=sys.stderr,
    )
    try:
        with _sigterm_as_interrupt(), wording(flag_words(parser)):
            return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("bpl: interrupted; the last complete epoch is in last.pt, continue with --resume",
              file=sys.stderr)
        return 130
    except (BPLError, FileNotFoundError, NotADirectoryError) as exc:
        if args.debug:
            raise
        print(f"bpl: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a full or read-only disk, and the like: say which, and what to do
        if args.debug:
            raise
        print(f"bpl: error: {os_error_message(exc)}", file=sys.stderr)
        return 1


def os_error_message(exc: OSError) -> str:
    """One line for an operating-system error: what failed, where, and the fix."""
    where = f" ({exc.filename})" if exc.filename else ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"no space left on the disk{where}: free some space (or pass --out on another "
                "disk) and run again; a run that finished an epoch continues with --resume")
    if exc.errno == errno.EROFS:
        return f"the file system is read-only{where}: pass --out on a writable disk"
    if isinstance(exc, PermissionError):
        return (f"{exc.strerror or 'permission denied'}{where}: pass --out (or the file) "
                "somewhere you may write, or change the folder's permissions")
    return f"{exc.strerror or exc}{where}"


if __name__ == "__main__":
    sys.exit(main())
