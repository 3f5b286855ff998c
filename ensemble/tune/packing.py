"""`resources: {gpu: auto}`: measure what one fold of each model needs on a GPU, pack as many folds per GPU as fit.

Ray's fractional GPUs are logical: `gpu: 0.25` puts four folds on a GPU whether or
not their memory fits. With `gpu: auto` the launch measures instead:

  measure      one Ray task holding a whole GPU runs two AdamW training steps (AMP as the
               model's params say) per (backbone, image size, batch size, AMP) key, at the
               largest image size of the model's stages, and reads the peak memory the
               caching allocator reserved, plus the CUDA context a fold process adds
  cache        the needs are kept per GPU name and torch version in $ENSEMBLE_CACHE_DIR/gpu_memory.json
               (default ~/.cache/ensemble), so a resume or the next sweep measures nothing
  pack         folds per GPU = floor(GPU memory x SAFETY / need), with the memory of the cluster's
               smallest GPU (a fraction is the same wherever Ray places the fold); the model's
               fraction is 1 / that, so a GPU holds as many of its folds as fit, with a margin for
               the allocator's fragmentation and the held-out evaluation

Only the measurement needs a GPU (scripts/gpu_check.py runs it there); the
arithmetic and the placement are tested with logical GPUs and given needs.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from ensemble.errors import UserError
from ensemble.io import write_json
from ensemble.run.layout import stage_size
from ensemble.run.storage import cache_root

SAFETY = 0.85  # of a GPU's memory that packed folds may fill
MEASURE_TIMEOUT = 900  # seconds for the measuring task: imports, cuDNN's autotuning, a few backbones
MAX_PER_GPU = 64  # folds (processes) per GPU; also where Ray's 1e-4 resolution still tells n from n + 1
GIB = 2 ** 30


def key_of(config: dict) -> str:
    """The measurement key of a model: backbone, its largest stage image size, batch size, AMP."""
    params = config["params"]
    size = max(stage_size(config, stage) for stage in config["stages"])
    return f"{config['backbone']}@{size}px/batch{params['batch_size']}/amp={bool(params.get('amp', True))}"


def cache_file() -> Path:
    return cache_root() / "gpu_memory.json"


def _read_cache() -> dict:
    """{GPU name: {key: bytes}}; what is missing, unreadable or of another shape is measured again."""
    try:
        cache = json.loads(cache_file().read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(cache, dict):
        return {}
    return {gpu: {k: v for k, v in needs.items() if isinstance(v, (int, float)) and v > 0}
            for gpu, needs in cache.items() if isinstance(needs, dict)}


def fractions(configs: list[dict], *, cpus: float = 1.0, log=print) -> dict[str, float]:
    """{model_id: the GPU fraction of one of its folds}, measuring on a cluster GPU what the cache lacks."""
    import ray

    keys = sorted({key_of(c) for c in configs})
    sizes = _gpus_per_node()  # they run while the measurement does
    gpu, needs, measured = gpu_needs(configs, cpus, log)
    # A fraction is the same on every GPU: sized for the smallest, a fold fits wherever Ray places it.
    try:
        nodes = ray.get(sizes, timeout=MEASURE_TIMEOUT) if sizes else []
    except ray.exceptions.RayError as exc:  # a node lost meanwhile
        nodes = [[]] * len(sizes)
        log(f"note: gpu: auto could not read the GPUs' sizes ({type(exc).__name__}).")
    if [] in nodes:
        log(f"note: gpu: auto found no CUDA device on {nodes.count([])} of the {len(nodes)} GPU node(s) it asked; "
            "it packs as if their GPUs were as large as the one it measured on.")
    gpus = [g for node in nodes for g in node]
    smallest = min([gpu, *gpus], key=lambda g: g["total"])  # the measured one on a tie
    on = f"{gpu['name']} ({gpu['total'] / GIB:.0f} GiB)"
    if smallest is not gpu:
        on = f"the cluster's smallest GPU, {smallest['name']} ({smallest['total'] / GIB:.0f} GiB; measured on {on})"
    packed = pack(needs, smallest["total"])
    for key in keys:
        log(f"gpu: auto on {on}: {key} needs {needs[key] / GIB:.2f} GiB per fold"
            f"{' (measured now)' if key in measured else ''}: {round(1 / packed[key])} fold(s) per GPU "
            f"(gpu {packed[key]:g})")
    return {c["model_id"]: packed[key_of(c)] for c in configs}


def gpu_needs(configs: list[dict], cpus: float, log=print) -> tuple[dict, dict[str, int], set[str]]:
    """(the GPU's name and bytes, {key: bytes one fold needs}, the keys measured now) for the models' keys:
    one Ray task holding a whole GPU measures the keys the cache lacks for that GPU's name."""
    import ray

    if not ray.cluster_resources().get("GPU", 0):
        raise UserError("resources.gpu: auto measures each model's training memory on a GPU, and this Ray cluster "
                        "has none. Give resources.gpu a number (0 trains on CPUs), or join a GPU cluster with "
                        "--address. Nothing was written.")
    cache = _read_cache()
    by_key = {key_of(c): c for c in configs}
    if not any(set(by_key) <= set(known) for known in cache.values()):  # no GPU type has them all yet
        log(f"gpu: auto: measuring the training memory of {len(by_key)} backbone x size x batch on a GPU "
            f"(kept in {cache_file()} for the next launch) ...")
    gpu, measured = _run_on_a_gpu(list(by_key.values()), cache, cpus)
    if gpu is None:
        raise UserError("resources.gpu: auto needs a CUDA GPU to measure on, but the task Ray gave a GPU found "
                        f"none (torch.cuda.is_available() is False with {measured}: this cluster's GPUs are "
                        "logical). Give resources.gpu a number. Nothing was written.")
    if measured:
        cache.setdefault(gpu["name"], {}).update(measured)
        try:
            write_json(cache, cache_file())
        except OSError as exc:  # a read-only home: measured again next time, nothing else lost
            log(f"note: could not keep the measurements in {cache_file()} ({exc.strerror}).")
    return gpu, {k: cache[gpu["name"]][k] for k in by_key}, set(measured)


def pack(needs: dict[str, float], total: float) -> dict[str, float]:
    """{key: GPU fraction}: 1 / the folds of that need that fit in `total` bytes with the SAFETY margin,
    rounded down to Ray's resolution (1e-4): n folds of it fit on a GPU, n + 1 do not."""
    out = {}
    for key, need in needs.items():
        per_gpu = math.floor(total * SAFETY / need)
        if per_gpu < 1:
            raise UserError(f"resources.gpu: auto: one fold of {key} needs {need / GIB:.1f} GiB, more than "
                            f"{SAFETY:.0%} of this GPU's {total / GIB:.1f} GiB. Lower params.batch_size or "
                            "image_size, or turn on params.amp.")
        out[key] = math.floor(1e4 / min(per_gpu, MAX_PER_GPU)) / 1e4
    return out


# --------------------------------------------------------------------------- on the GPU


def _run_on_a_gpu(configs: list[dict], cache: dict, cpus: float) -> tuple[dict | None, dict]:
    import ray

    task = ray.remote(max_calls=1)(_measure).options(num_gpus=1, num_cpus=cpus, scheduling_strategy="DEFAULT")
    ref = task.remote(configs, cache)
    try:
        return ray.get(ref, timeout=MEASURE_TIMEOUT)
    except ray.exceptions.GetTimeoutError:
        ray.cancel(ref, force=True)
        raise UserError(f"resources.gpu: auto waited {MEASURE_TIMEOUT} s for a whole free GPU to measure on (every "
                        "GPU is partly in use?). Give resources.gpu a number. Nothing was written.") from None


def _gpus_per_node() -> list:
    """One task per alive node with GPUs (no resources held), each returning [{"name", "total"}] for the GPUs
    Ray hands out there (the first n its workers see, n = the node's GPU count). A task given no GPU keeps
    its worker's CUDA_VISIBLE_DEVICES, the node's in a fresh worker; the env var of its own makes Ray start
    one (a reused worker may have started CUDA with a GPU task's narrower list) and keeps Ray from emptying
    the variable for a task without GPUs where a cluster sets RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(max_calls=1)(node_gpus)
    return [task.options(num_cpus=0, runtime_env={"env_vars": {"RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}},
                         scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
                         ).remote(int(node["Resources"]["GPU"]))
            for node in ray.nodes() if node["Alive"] and node["Resources"].get("GPU")]


def node_gpus(limit: int | None = None) -> list[dict]:
    """[{"name", "total": bytes}] of the first `limit` GPUs this process sees (all by default); none without CUDA."""
    import torch

    if not torch.cuda.is_available():  # logical GPUs, or a node whose CUDA does not start
        return []
    props = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())[:limit]]
    return [{"name": p.name, "total": p.total_memory} for p in props]


def _measure(configs: list[dict], cache: dict) -> tuple[dict | None, dict]:
    """The Ray task: (this GPU's name and memory, {key: bytes one fold needs} for the keys `cache` lacks)."""
    import torch

    if not torch.cuda.is_available():
        return None, f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')!r}"
    # Keyed by torch too: another release's allocator and kernels need other amounts of memory.
    name = f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    known = cache.get(name, {})
    out = {}
    for config in configs:
        key = key_of(config)
        if key not in known:
            params = config["params"]
            size = max(stage_size(config, stage) for stage in config["stages"])
            try:
                out[key] = training_peak(config["backbone"], len(config.get("classes") or [0, 1]),
                                         params["batch_size"], size, bool(params.get("amp", True)))["need_bytes"]
            except torch.cuda.OutOfMemoryError:  # more than the whole GPU: `pack` says what to lower
                torch.cuda.empty_cache()
                out[key] = torch.cuda.get_device_properties(0).total_memory + 1
    return {"name": name, "total": torch.cuda.get_device_properties(0).total_memory}, out


def training_peak(backbone: str, n_classes: int, batch: int, size: int, amp: bool, device: str = "cuda") -> dict:
    """Two AdamW training steps of a fresh `backbone` at `batch` x `size` px: the second step's peak (it holds
    the optimizer's moments, which the first step creates). No loss scaler: GradScaler skips the update of a
    step whose fp16 gradients overflow, as the first steps of a fresh model may at its initial scale (a CPU
    fp16 run of inception_v3 skipped 4 of 4), which would leave the moments out of the measurement.

    Returns {"peak_bytes": the caching allocator's peak reservation, "context_bytes": what the process
    holds besides (the CUDA context), "need_bytes": their sum, "step_seconds"}; on a CPU the bytes are None."""
    import torch

    from ensemble.models import create_model

    cuda = device == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = create_model(backbone, n_classes).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, n_classes, (batch,), device=device)
    for _ in range(2):
        start = time.perf_counter()
        with torch.autocast(device, enabled=amp and cuda):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()  # always: its moments (2 x the fp32 parameters) are part of every later step
        if cuda:
            torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if not cuda:
        return {"peak_bytes": None, "context_bytes": None, "need_bytes": None, "step_seconds": seconds}
    peak = torch.cuda.max_memory_reserved()
    free, total = torch.cuda.mem_get_info()
    context = max(0, total - free - torch.cuda.memory_reserved())  # this process's CUDA context (and any other user)
    del model, optimizer, x, y, loss
    torch.cuda.empty_cache()
    return {"peak_bytes": peak, "context_bytes": context, "need_bytes": peak + context, "step_seconds": seconds}
