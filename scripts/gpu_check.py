"""The GPU path in one call: training with AMP and its resume, TTA prediction throughput, peak training
memory per backbone of the shipped spaces, and (with Ray installed) a sweep packing folds at gpu: 0.25.

    python scripts/gpu_check.py --out DIR              # on a CUDA machine (a few minutes on one H200)
    python scripts/gpu_check.py --device cpu --smoke   # the same code paths, tiny, on a CPU (tests/test_gpu_check.py)

Needs torch, timm, opencv, pandas and scikit-learn; no network, no demo data (it draws its own
images: circles against squares), Ray only for the last part (skipped without it). Prints each
figure and writes DIR/gpu_check.json after every part; a part that raises is recorded as a failure
(its traceback printed) and the others still run. Exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ensemble.data import views  # noqa: E402
from ensemble.data.loader import normalize_batch  # noqa: E402
from ensemble.errors import UserError  # noqa: E402
from ensemble.models import create_model  # noqa: E402
from ensemble.predict.plan import Job  # noqa: E402
from ensemble.predict.pool import Predictor  # noqa: E402
from ensemble.run import Run  # noqa: E402
from ensemble.tune import launch, packing  # noqa: E402
from ensemble.tune.spaces import REPO_SPACES, load_space, resolve_models  # noqa: E402
from ensemble.tune.train import FoldTrainer  # noqa: E402

GIB = packing.GIB
EIGHT_VIEWS = "orig,hflip,vflip,rotate:5,rotate:-5,rotate:10,rotate:-10,hflip+rotate:5"
failures: list[str] = []


def check(ok: bool, what: str) -> bool:
    print(f"   {'ok  ' if ok else 'FAIL'} {what}")
    if not ok:
        failures.append(what)
    return ok


def draw_images(folder: Path, n: int, size: int, seed: int) -> Path:
    """n PNGs, half circles and half squares at random places, sizes and colours on noise; their manifest."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        img = rng.integers(0, 80, (size, size, 3), dtype=np.uint8)
        r, (x, y) = int(rng.integers(size // 8, size // 4)), rng.integers(size // 4, 3 * size // 4, 2)
        colour = tuple(int(c) for c in rng.integers(120, 256, 3))
        if i % 2:
            cv2.rectangle(img, (int(x - r), int(y - r)), (int(x + r), int(y + r)), colour, -1)
        else:
            cv2.circle(img, (int(x), int(y)), r, colour, -1)
        cv2.imwrite(str(folder / f"{seed}_{i}.png"), img)
        rows.append({"id": f"{seed}_{i}", "image": f"{seed}_{i}.png", "label": "square" if i % 2 else "circle"})
    path = folder / f"manifest{seed}.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def write_space(work: Path, args, **changes) -> Path:
    images = work / "images"
    space = {"data": {"manifest": str(draw_images(images, args.rows, args.image_size, 0)),
                      "test_manifest": str(draw_images(images, args.rows // 2, args.image_size, 1)), "root": str(images),
                      "preprocess": "pad", "augment": "hflip", "tta": "orig", "check_images": "exists"},
             "folds": {"k": 2, "strategy": "stratified", "seed": 0}, "backbones": [args.backbone],
             "params": {"lr": 1e-3, "batch_size": args.batch, "image_size": args.image_size, "amp": True},
             "epochs": args.epochs, "metric": "log_loss", "resources": {"cpu": 1, "gpu": 0}}
    space.update(changes)
    path = work / f"space{len(changes)}.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


def train_and_resume(work: Path, args, device: str) -> dict:
    """One fold: all epochs but the last, then a new trainer restored from last.pt trains the last one."""
    print(f"\n1. one fold of {args.backbone} at {args.image_size} px, batch {args.batch}, AMP on {device}")
    run_dir = work / "run"
    config = launch.prepare_run(load_space(str(write_space(work, args))), run_dir)[0]
    trainer = FoldTrainer(config, 0, run_dir, cpus=args.cpus, device=device)
    start = time.perf_counter()
    while trainer.epoch < args.epochs - 1:
        trainer.train_epoch()
    seconds = time.perf_counter() - start
    resumed = FoldTrainer(config, 0, run_dir, cpus=args.cpus, device=device)
    restored = resumed.restore()
    resumed.train_epoch()
    losses = [row["train_loss"] for row in resumed.history]
    out = {"train_loss": losses, "valid_log_loss": [row["log_loss"] for row in resumed.history],
           "seconds_per_epoch": seconds / max(1, args.epochs - 1), "amp": device == "cuda",
           "train_images_per_s": len(trainer.train_rows) * (args.epochs - 1) / seconds}
    print(f"   train loss per epoch {[round(v, 4) for v in losses]}, {out['seconds_per_epoch']:.2f} s an epoch, "
          f"{out['train_images_per_s']:.0f} training images/s")
    check(all(np.isfinite(losses)), "the losses are finite (AMP did not overflow)")
    check(losses[-1] < losses[0] or args.smoke, "the training loss fell")
    check(restored and resumed.epoch == args.epochs, "a new trainer continued from last.pt to the last epoch")
    check((Run(run_dir).fold_dir(config["model_id"], 0) / "weights.pt").exists(), "weights.pt was saved")
    return out | {"config": config, "run": run_dir}


def tta_throughput(trained: dict, args, device: str) -> dict:
    """Images/s of the predictor's forward (decode + views + model) against a plain loop over decoded tensors."""
    config, run = trained["config"], Run(trained["run"])
    test = pd.read_csv(config["data"]["test_manifest"])
    paths = [str(Path(config["data"]["root"]) / p) for p in test["image"]]
    print(f"\n2. TTA prediction of {len(paths)} images, forward batch {args.forward_batch}")
    out = {}
    for spec in ("orig", EIGHT_VIEWS):
        n_views = views.count_views(spec)
        job = Job(key=(config["model_id"], 0, "test"), run=run.location,
                  weights=run.rel(run.fold_dir(config["model_id"], 0) / "weights.pt"), cache=None, cache_n=0,
                  cache_rows=None, backbone=config["backbone"], n_classes=len(config["classes"]), dropout=0.0,
                  drop_path=0.0, task="multiclass", image_size=args.image_size, preprocess="pad", tta=spec,
                  n_views=n_views, merge="mean", per_view=False, amp=True, mean=tuple(config["data"]["normalize"]["mean"]),
                  std=tuple(config["data"]["normalize"]["std"]), on_bad_image="raise",
                  batch=max(1, args.forward_batch // n_views))
        # On a GPU the actor's CPUs decode in loader workers, as a pool's GPU actor does; on a CPU torch's
        # own thread count, as the plain loop.
        predictor = Predictor(cpus=args.cpus if device == "cuda" else None)
        predictor.device = torch.device(device)  # the checked device, even on a machine that has the other one
        predictor.predict(job, paths, 0, min(len(paths), job.batch))  # warm: model, loader, CUDA kernels
        start = time.perf_counter()
        result = predictor.predict(job, paths, 0, len(paths))
        rate = len(paths) / (time.perf_counter() - start)
        out[f"{n_views}_views_images_per_s"] = rate
        check(np.isfinite(result["merged"]).all(), f"{n_views} view(s): finite probabilities")
        print(f"   predictor, {n_views} view(s): {rate:.0f} images/s ({rate * n_views:.0f} views/s)")
    model = create_model(config["backbone"], len(config["classes"])).to(device).eval()
    x = torch.randint(0, 256, (args.forward_batch, 3, args.image_size, args.image_size), dtype=torch.uint8, device=device)
    with torch.inference_mode(), torch.autocast(device, enabled=device == "cuda"):
        for _ in range(3):
            model(normalize_batch(x, config["data"]["normalize"]["mean"], config["data"]["normalize"]["std"]))
        _sync(device)
        start, repeats = time.perf_counter(), max(3, len(paths) // args.forward_batch)
        for _ in range(repeats):
            model(normalize_batch(x, config["data"]["normalize"]["mean"], config["data"]["normalize"]["std"]))
        _sync(device)
    out["plain_loop_images_per_s"] = repeats * args.forward_batch / (time.perf_counter() - start)
    out["predictor_vs_plain"] = out["1_views_images_per_s"] / out["plain_loop_images_per_s"]
    print(f"   plain {device} loop on decoded tensors: {out['plain_loop_images_per_s']:.0f} images/s; the predictor "
          f"(with decoding) runs at {out['predictor_vs_plain']:.2f}x that; 8 views cost "
          f"{out['1_views_images_per_s'] / out['8_views_images_per_s']:.1f}x one")
    return out


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_memory(args, device: str) -> dict:
    """What `resources: {gpu: auto}` measures (ensemble.tune.packing.training_peak) for every backbone of the
    shipped spaces at its space's batch and image size, and the folds per GPU it would pack."""
    print("\n3. training memory per backbone at its space's batch and image size (gpu: auto's measurement)")
    combos = {}
    for path in sorted(REPO_SPACES.glob("*.yaml")):
        try:
            space = load_space(str(path))
        except UserError as exc:  # an albumentations pipeline where albumentations is not installed: skipped
            if "not installed" not in str(exc):
                check(False, f"{path.name} loads ({exc})")
            print(f"   skipped {path.name}: {exc}")
            continue
        if space.task == "retrieval":
            continue
        for spec in resolve_models(space):
            p = spec.params
            combos.setdefault((spec.backbone, p["batch_size"], p["image_size"], p["amp"]), path.stem)
    if args.smoke:  # the code path only: the shipped spaces' big backbones would take minutes on a CPU
        combos = {(b, 2, 32, amp): s for (b, _, _, amp), s in combos.items() if b.startswith("test_")}
    gpus = packing.node_gpus()  # the function gpu: auto's task runs on each GPU node, to pack for its smallest GPU
    print("   this node's GPUs: " + (", ".join(f"{g['name']} ({g['total'] / GIB:.1f} GiB)" for g in gpus) or "none"))
    check(bool(gpus) == torch.cuda.is_available(), "gpu: auto reads the node's GPUs where CUDA is")
    total = min(g["total"] for g in gpus) if gpus and device == "cuda" else None
    out = {"gpus": gpus}
    for (backbone, batch, size, amp), space in combos.items():
        key = f"{backbone}@{size}px/batch{batch}/amp={amp}"
        try:
            peak = packing.training_peak(backbone, 10, batch, size, amp, device=device)
        except Exception as exc:  # noqa: BLE001 - one backbone's failure (an unknown timm name...) is recorded
            out[key] = {"error": f"{type(exc).__name__}: {exc}", "space": space}
            check(False, f"{backbone} took two training steps ({type(exc).__name__}: {exc})")
            continue
        share = packing.pack({key: peak["need_bytes"]}, total)[key] if total else None
        out[key] = dict(peak, space=space, gpu_share=share)
        print(f"   {backbone:<24} {size:>4} px x {batch:>3} ({space}): " + (
            f"peak {peak['peak_bytes'] / GIB:6.2f} GiB + context {peak['context_bytes'] / GIB:.2f} GiB: "
            f"{round(1 / share)} fold(s) per GPU (gpu {share:g})" if share else "peak n/a on a CPU"))
    check(len(out) > 1, "the shipped spaces have backbones to measure")
    return out


def ray_sweep(work: Path, args, device: str) -> dict:
    """A 4-fold sweep at gpu: 0.25 on one GPU: the folds must run on device 0 at the same time."""
    print("\n4. a sweep with gpu: 0.25 on one GPU (Ray)")
    if importlib.util.find_spec("ray") is None or device != "cuda":
        why = "Ray is not installed" if importlib.util.find_spec("ray") is None else "it needs a GPU"
        print(f"   skipped: {why}")
        return {"skipped": why}
    space = write_space(work, args, folds={"k": 4, "strategy": "stratified", "seed": 0},
                        resources={"cpu": 1, "gpu": 0.25})
    board = launch.run_sweep(load_space(str(space)), work / "sweep", verbose=0)
    run = Run(work / "sweep")
    history = [run.read_metrics(board["model_id"][0], k)["history"] for k in range(4)]
    spans = [(h[0]["started"], h[-1]["started"] + h[-1]["seconds"]) for h in history]
    overlap = min(end for _, end in spans) > max(start for start, _ in spans)
    check({row["device"] for h in history for row in h} == {"0"}, "all four folds ran on GPU 0")
    check(overlap, "the four folds trained at the same time")
    import ray

    sizes = ray.get(packing._gpus_per_node(), timeout=120)  # gpu: auto's per-node task, on the sweep's cluster
    check(sizes == [packing.node_gpus()], f"gpu: auto's task read this node's GPUs through Ray ({sizes})")
    return {"devices": sorted({row["device"] for h in history for row in h}), "concurrent": overlap}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--smoke", action="store_true", help="tiny shapes (the CPU test)")
    p.add_argument("--out", default=".", help="where gpu_check.json goes")
    p.add_argument("--backbone", help="the trained backbone [resnet50; test_resnet with --smoke]")
    args = p.parse_args(argv)
    big = not args.smoke
    args.backbone = args.backbone or ("resnet50" if big else "test_resnet")
    args.rows, args.image_size, args.batch = (2048, 224, 64) if big else (48, 32, 8)  # 16 steps an epoch
    args.epochs, args.forward_batch, args.cpus = (3, 256, 8) if big else (2, 16, 1)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device; use --device cpu --smoke for the CPU-safe parts.", file=sys.stderr)
        return 2
    info = {"device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu", "torch": torch.__version__,
            "cuda": torch.version.cuda, "smoke": args.smoke,  # loader workers share batches through /dev/shm
            "dev_shm_gib": shutil.disk_usage("/dev/shm").total / 2 ** 30 if Path("/dev/shm").exists() else None}
    print(f"gpu_check on {info['device']} (torch {info['torch']}, CUDA {info['cuda']})")
    out = Path(args.out) / "gpu_check.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"info": info, "failures": failures}
    with tempfile.TemporaryDirectory() as tmp:
        trained = {}
        parts = {"train": lambda: train_and_resume(Path(tmp), args, args.device),
                 "tta": lambda: tta_throughput(trained, args, args.device) if trained else {"skipped": "no trained fold"},
                 "memory": lambda: peak_memory(args, args.device), "ray": lambda: ray_sweep(Path(tmp), args, args.device)}
        for name, part in parts.items():
            try:
                result = part()
            except Exception as exc:  # noqa: BLE001 - recorded; the other parts still run
                traceback.print_exc()
                result = {"error": f"{type(exc).__name__}: {exc}"}
                check(False, f"part {name!r} ran ({type(exc).__name__}: {exc})")
            if name == "train" and "config" in result:
                trained = result
                result = {k: v for k, v in result.items() if k not in ("config", "run")}
            report[name] = result
            out.write_text(json.dumps(report, indent=2, default=str) + "\n")  # what is known so far, every part
    print(f"\n{'all checks passed' if not failures else f'{len(failures)} check(s) failed: {failures}'}; wrote {out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
