"""Conformance across the zoo: extend / fuse / prune / export on every torchvision CNN (+ timm).

Each model runs in its own subprocess with a timeout (a hang or crash names itself and
the run goes on); results go to ``benchmarks/results/zoo.json`` after every model, so a
cut-off run resumes where it stopped (models already there are skipped; ``--redo``
runs them again). ``docs/zoo.md`` is written from the JSON (``--table`` only rewrites it).

    nice -n 10 python benchmarks/zoo.py                 # everything, resumable
    python benchmarks/zoo.py --models resnet18,tv:vgg11 # a few (timm models as timm:NAME)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from bpl.files import atomic_write_text

HERE = Path(__file__).resolve().parent
RESULTS = Path(os.environ.get("BPL_BENCH_RESULTS") or HERE / "results") / "zoo.json"
DOC = (RESULTS.parent / "zoo.md" if os.environ.get("BPL_BENCH_RESULTS")
       else HERE.parent / "docs" / "zoo.md")
#: The partner kind checked (--partner); another kind than the default writes zoo_<kind>.*.
PARTNER = "same"


def use_partner(kind: str) -> None:
    """Check partners of ``kind``, with results in their own files (the default kind's: zoo.*)."""
    global PARTNER, RESULTS, DOC
    PARTNER = kind
    if kind != "same":
        RESULTS = RESULTS.with_name(f"zoo_{kind}.json")
        DOC = DOC.with_name(f"zoo_{kind}.md")

#: torchvision models that are transformers: no convs to give partners (or only a patch stem).
OUT_OF_SCOPE = {
    "vit_": "Vision Transformer: one patch-embedding conv, the rest attention and MLP (Linear)",
    "swin_": "Swin Transformer: patch embedding, then windowed attention and MLP (Linear)",
    "maxvit_": "MaxViT: a hybrid transformer (block/grid attention after each MBConv); "
               "counted with the transformers, not run",
}
#: A representative set of timm's CNN families (pretrained=False).
TIMM_MODELS = [
    "resnet26d", "regnety_002", "efficientnet_b0", "mobilenetv3_small_050", "convnext_atto",
    "cspresnet50", "dla34", "resnetv2_50", "densenet121", "ghostnet_100", "rexnet_100",
    "tf_efficientnet_b0", "hrnet_w18_small", "res2net50_14w_8s", "dpn68",
]
#: Too big for this 23 GB / 2-core machine: fp64 copies alone pass 20 GB.
TOO_BIG = {"regnet_y_128gf": "644M parameters: the float64 copies (base, extended, fused) "
                             "do not fit in 23 GB of memory"}
#: Models whose prune / ONNX checks are skipped as impractically slow here (>= 100M parameters).
SLOW_PARAMS = 100e6
SIZES = (64, 96, 128, 160, 224, 299)
CHECK_LIMIT = 300  # seconds per check: a check that never ends is recorded, the rest still run
#: Why a check fails where that is understood (shown under the table).
EXPLAINED = {
    ("timm:res2net50_14w_8s", "prune"):
        "Torch-Pruning 1.6.0 alone fails the same way on the plain model (its own "
        "MagnitudePruner: IndexError, index 196 into a 112-channel conv across Res2Net's "
        "split-and-concatenate hierarchy): a limit of the pruning step, not of extend/fuse",
    ("timm:dpn68", "prune"):
        "Torch-Pruning 1.6.0 alone fails the same way on the plain model (its own "
        "MagnitudePruner: TypeError in the concat index mapping of DPN's dual paths while "
        "building the dependency graph): a limit of the pruning step",
    ("timm:rexnet_100", "prune"):
        "Torch-Pruning 1.6.0's group search (`_fix_dependency_graph_non_recursive`) did not "
        "finish on ReXNet's partial-channel residual (`x[:, :c] += shortcut`): stopped after "
        "the zoo's 300 s per check, on the plain model; the other checks ran",
    ("tv:efficientnet_v2_m", "prune_fuse"):
        "ill-conditioned, not the fold: with random BN statistics and random partners on "
        "all of its convs, the net amplifies rounding so much (its output reaches 4e4 and "
        "moves 1.5e-10 when the input is rounded) that the end-to-end error sits at the "
        "bar; block by block, the same input into each extended and fused MBConv differs "
        "by at most 1.3e-13 (float64), so each fusion is exact (these three figures were "
        "measured once by hand when the row was investigated, not by this script)",
    ("tv:shufflenet_v2_x0_5", "prune"):
        "Torch-Pruning's dependency graph fails on the channel shuffle (reshape index mapping, "
        "ZeroDivisionError) while pruning the plain model: a limit of the pruning step, not "
        "of extend/fuse",
    ("timm:cspresnet50", "prune"):
        "Torch-Pruning's groups index past a conv across CSP's split/concat (IndexError in "
        "the importance scores) while pruning the plain model: a limit of the pruning step",
}
EXPLAINED.update({(f"tv:shufflenet_v2_{w}", "prune"): EXPLAINED[("tv:shufflenet_v2_x0_5", "prune")]
                  for w in ("x1_0", "x1_5", "x2_0")})  # the same channel shuffle


def zoo() -> list[str]:
    """Every model of the run, ``tv:NAME`` (torchvision) and ``timm:NAME``."""
    import torchvision

    names = [f"tv:{n}" for n in torchvision.models.list_models(module=torchvision.models)]
    try:
        import timm  # noqa: F401
    except ImportError:
        return names
    return names + [f"timm:{n}" for n in TIMM_MODELS]


def out_of_scope(name: str) -> str | None:
    short = name.split(":", 1)[1]
    for prefix, why in OUT_OF_SCOPE.items():
        if short.startswith(prefix):
            return why
    return TOO_BIG.get(short)


def builder(name: str):
    lib, short = name.split(":", 1)
    if lib == "timm":
        import timm

        return lambda: timm.create_model(short, pretrained=False, num_classes=10)
    import torchvision

    kw = {"aux_logits": False, "init_weights": False} if short in ("googlenet", "inception_v3") else {}
    return lambda: torchvision.models.get_model(short, weights=None, num_classes=10, **kw)


def smallest_input(build) -> int:
    """The smallest size in :data:`SIZES` the model runs on (eval mode, batch 2)."""
    model = build().eval()
    for size in SIZES:
        try:
            with torch.no_grad():
                model(torch.randn(2, 3, size, size))
            return size
        except Exception:
            continue
    raise RuntimeError(f"runs on none of the input sizes {SIZES}")


def run_one(name: str) -> dict:
    """All checks on one model (in this process); the child's job."""
    from bpl.conformance import check_model

    torch.manual_seed(0)
    build = builder(name)
    start = time.perf_counter()
    size = smallest_input(build)
    params = sum(p.numel() for p in build().parameters())
    slow = params >= SLOW_PARAMS
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    result = check_model(build, x, partner=PARTNER, do_prune=not slow, do_onnx=not slow,
                         time_limit=CHECK_LIMIT)
    result.update(size=size, params=params, slow_skipped=slow,
                  seconds_total=round(time.perf_counter() - start, 1))
    return result


def load() -> dict:
    return json.loads(RESULTS.read_text()) if RESULTS.exists() else {"models": {}}


def save(data: dict) -> None:
    atomic_write_text(RESULTS, json.dumps(data, indent=1, sort_keys=True) + "\n")


def run_all(names: list[str], timeout: int, redo: bool) -> dict:
    data = load()
    for name in names:
        if name in data["models"] and not redo:
            continue
        why = out_of_scope(name)
        if why:
            data["models"][name] = {"out_of_scope": why}
            save(data)
            continue
        print(f"{name} ...", end=" ", flush=True)
        start = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, __file__, "--one", name, "--partner", PARTNER],
                                  capture_output=True, text=True, timeout=timeout)
            lines = proc.stdout.strip().splitlines()
            if proc.returncode == 0 and lines:
                entry = json.loads(lines[-1])
            else:
                entry = {"crash": f"exit {proc.returncode}: " + proc.stderr.strip()[-600:]}
        except subprocess.TimeoutExpired:
            entry = {"crash": f"timed out after {timeout} s"}
        entry["wall_s"] = round(time.perf_counter() - start, 1)
        data["models"][name] = entry
        save(data)
        checks = entry.get("checks", {})
        print(f"{entry['wall_s']} s", " ".join(f"{k}={'ok' if v['ok'] else 'FAIL'}"
                                               for k, v in checks.items()) or entry.get("crash"))
    return data


# --------------------------------------------------------------------------- the table

CHECK_TITLES = {"fuse_fp64": "fuse fp64", "fuse_fp32": "fuse fp32", "strict_load": "strict load",
                "prune": "prune 50%", "prune_fuse": "pruned fuse", "onnx": "ONNX",
                "move_fp64": "fp64 move"}


def _cell(check: dict | None) -> str:
    if check is None:
        return "–"
    err = check.get("error")
    if check.get("unjudged"):
        return "n/a"
    mark = "✓" if check["ok"] else "✗"
    if err is None:
        return mark
    if err == 0:
        return f"{mark} 0"
    return f"{mark} {err:.0e}" if err < 0.01 or err == 0 else f"{mark} {err:.3f}"


def table(data: dict) -> str:
    from bpl.conformance import CHECKS

    rows, scope, fails, notes, unjudged = [], [], [], [], []
    counts = {k: [0, 0] for k in CHECKS}
    for name, e in sorted(data["models"].items()):
        if "out_of_scope" in e:
            scope.append(f"- `{name}`: {e['out_of_scope']}")
            continue
        if "crash" in e:
            rows.append(f"| `{name}` | – | – | {' | '.join('✗' for _ in CHECKS)} | {e['wall_s']} s |")
            fails.append(f"- `{name}`: {e['crash'][:300]}")
            continue
        partners = ", ".join(f"{n} {k}" for k, n in sorted(e.get("partners", {}).items())) or "0"
        skipped = "; ".join(f"{n}× {r}" for r, n in sorted(e.get("skipped", {}).items())) or "–"
        cells = []
        for key in CHECKS:
            c = e["checks"].get(key)
            cells.append(_cell(c) if c or not e.get("slow_skipped") else "skipped (slow)")
            if c and c.get("unjudged"):
                unjudged.append(f"- `{name}` {CHECK_TITLES[key]}: {c['note']}")
            elif c:
                counts[key][0 if c["ok"] else 1] += 1
                if not c["ok"]:
                    why = EXPLAINED.get((name, key), c["note"] or c["error"])
                    fails.append(f"- `{name}` {CHECK_TITLES[key]}: {why}")
                elif (key in ("prune", "onnx") and "px" in c["note"] or "global" in c["note"]
                      or "ill-conditioned" in c["note"]):
                    notes.append(f"- `{name}` {CHECK_TITLES[key]}: {c['note']}")
        rows.append(f"| `{name}` | {e['size']} | {partners} | {skipped} | {' | '.join(cells)} "
                    f"| {e['wall_s']} s |")
    head = ("| model | input px | partners (kind) | convs skipped | "
            + " | ".join(CHECK_TITLES[k] for k in CHECKS) + " | time |")
    sep = "|" + "---|" * (5 + len(CHECKS))
    pending = [n for n in sorted(zoo(), key=_bigness) if n not in data["models"]]
    scope += [f"- `{n}`: {out_of_scope(n)}" for n in pending if out_of_scope(n)]
    missing = [n for n in pending if not out_of_scope(n)]
    summary = ", ".join(f"{CHECK_TITLES[k]} {ok}/{ok + bad}" for k, (ok, bad) in counts.items())
    return "\n".join([
        "# bpl across the zoo",
        "",
        "Generated by `nice -n 10 python benchmarks/zoo.py` (results: "
        "`benchmarks/results/zoo.json`). Every model is built with random weights "
        "(`pretrained=False`, 10 classes), its BatchNorms get random affine parameters and "
        "statistics, and partners go on **every** conv that can have one "
        "(`placement='all'`); before fusing, partner BNs and conv-partner scales are "
        "randomised so that the partners matter. Input: batch 2 at the smallest of "
        f"{', '.join(map(str, SIZES))} px the model runs on.",
        "",
        "Checks (cells give the measured error; ✓ within tolerance):",
        "- **fuse fp64 / fp32**: `extend` (output unchanged at `init='preserve'`), then "
        "`fuse` and `fuse(fold_bn=True)` against the extended model: max relative error "
        "<= 1e-9 at float64, <= 1e-4 at float32, or 10 rounding floors where that is "
        "larger: the floor is how far the extended model's own output moves when its input "
        "is rounded at that precision (`bpl.conformance.rounding_floor`). Random BN "
        "statistics and partners on every conv make some deep nets so ill-conditioned that "
        "no re-arrangement of the arithmetic can do better; those cells are listed under "
        "the notes with their floor;",
        "- **strict load**: the fused `state_dict` loads with `strict=True` into a fresh "
        "model of the stock architecture and computes the same;",
        "- **prune 50%**: `bpl.prune(flops_reduction=0.5)` lands within ±1 point (cell: the "
        "gap; per-layer ratios first, global ranking where those jump in coarse steps; "
        "the note in zoo.json names the `round_to` used: rows measured before `round_to=8` "
        "became the default pruned without rounding, and `--redo` measures them again);",
        "- **pruned fuse**: `extend` -> `fuse` of the pruned model, float64, <= 1e-9;",
        "- **ONNX**: `bpl.export` of the extended model (fused, BN folded), parity <= 1e-4 at "
        "batch 1 and 5 (cell: its reported error);",
        "- **fp64 move**: extended in float32, moved with `.double()`, fused: every "
        "parameter and buffer float64 and <= 1e-9 against the extended model.",
        "",
        f"**Summary**: {summary}.",
        "",
        head,
        sep,
        *rows,
        "",
        "## Failures and limitations",
        "",
        *(fails or ["None."]),
        "",
        "## Not judged: the randomised network is rounding noise at that precision",
        "",
        "Where ten rounding floors exceed 1e-2, no error could say anything about the "
        "fusion, so the cell reads n/a and is not counted; the same model's float64 checks "
        "carry the claim.",
        "",
        *(unjudged or ["None."]),
        "",
        "## Notes on passed checks",
        "",
        *(notes or ["None."]),
        "",
        "## Out of scope",
        "",
        *scope,
        "",
        "## Not run yet",
        "",
        "The run is resumable (`python benchmarks/zoo.py` continues with these): "
        + (", ".join(f"`{n}`" for n in missing) or "none") + ".",
        "",
    ])


#: Name parts of the biggest models, run last so a cut-off run has covered the most models.
BIG = ("128gf", "32gf", "16gf", "8gf", "_large", "_base", "_small", "_l", "_m", "b7", "b6", "b5",
       "b4", "101", "152", "wide", "vgg", "densenet161", "densenet201", "inception")


def _bigness(name: str) -> int:
    return sum(part in name for part in BIG)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--models", help="comma-separated tv:NAME / timm:NAME (default: all)")
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per model")
    parser.add_argument("--redo", action="store_true", help="run models already in the results")
    parser.add_argument("--table", action="store_true", help="only rewrite docs/zoo.md")
    parser.add_argument("--partner", default="same",
                        help="the partner kind to check (bpl.PARTNER_KINDS); another than same "
                             "writes results/zoo_KIND.json and docs/zoo_KIND.md")
    args = parser.parse_args()
    use_partner(args.partner)
    if args.one:
        import warnings

        warnings.filterwarnings("ignore")
        print(json.dumps(run_one(args.one)))
        return
    if not args.table:
        names = args.models.split(",") if args.models else zoo()
        names = [n if ":" in n else f"tv:{n}" for n in names]
        # the biggest last, so a cut-off run has covered the most models
        run_all(sorted(names, key=_bigness), args.timeout, args.redo)
    atomic_write_text(DOC, table(load()))


if __name__ == "__main__":
    main()
