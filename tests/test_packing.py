"""resources: {gpu: auto}: the packing arithmetic, the measurement cache, the refusal without CUDA, and the
fractions reaching every fold on a cluster of logical GPUs (the measurement itself runs only on a GPU:
scripts/gpu_check.py part 3)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from sweep_fixtures import read_metrics, small_space

from ensemble.errors import UserError
from ensemble.tune import launch as tune
from ensemble.tune import packing, spaces

GIB = packing.GIB


def _config(backbone="test_resnet", size=32, batch=32, stages=None, amp=True, model_id="m"):
    return {"model_id": model_id, "backbone": backbone, "classes": ["a", "b"],
            "params": {"image_size": size, "batch_size": batch, "amp": amp},
            "stages": stages or [{"epochs": 1}]}


def test_pack_fills_a_gpu_with_the_folds_that_fit_under_the_margin():
    out = packing.pack({"small": 10 * GIB, "big": 30 * GIB, "whole": 60 * GIB}, 80 * GIB)
    assert out == {"small": 0.1666, "big": 0.5, "whole": 1.0}  # floor(68 / 10) = 6 folds, floor(68 / 30) = 2, at Ray's 1e-4 resolution
    for n in range(1, 200):  # at Ray's resolution n folds fit on a GPU and n + 1 do not (up to MAX_PER_GPU)
        share = packing.pack({"k": 80 * GIB * packing.SAFETY / (n + 0.5)}, 80 * GIB)["k"]
        n = min(n, packing.MAX_PER_GPU)
        assert n * share <= 1 < (n + 1) * share, n


def test_a_fold_larger_than_the_gpu_is_refused_with_what_to_change():
    with pytest.raises(UserError, match=r"one fold of resnet50@224px/batch256/amp=False needs 75\.0 GiB, more than "
                                        r"85% of this GPU's 80\.0 GiB\. Lower params\.batch_size"):
        packing.pack({"resnet50@224px/batch256/amp=False": 75 * GIB}, 80 * GIB)


def test_the_key_is_the_backbone_at_its_largest_stage_size_batch_and_amp():
    stages = [{"epochs": 1, "image_size": 64}, {"epochs": 1, "image_size": 128}, {"epochs": 1}]
    assert packing.key_of(_config(size=96, stages=stages, amp=False)) == "test_resnet@128px/batch32/amp=False"
    assert packing.key_of(_config(size=96)) == "test_resnet@96px/batch32/amp=True"


def test_training_peak_takes_two_steps_on_a_cpu_and_reports_no_bytes():
    out = packing.training_peak("test_resnet", 3, 2, 32, amp=True, device="cpu")
    assert out["need_bytes"] is None and out["step_seconds"] > 0


def test_measurements_are_cached_per_gpu_and_torch_and_a_second_launch_measures_nothing(tmp_path, monkeypatch):
    """The GPU task's own code (`_measure`) in this process, on a stand-in CUDA device; the Ray hop is
    tested with logical GPUs below."""
    monkeypatch.setenv("ENSEMBLE_CACHE_DIR", str(tmp_path / "cache"))
    calls = []

    def fake_peak(backbone, n_classes, batch, size, amp):
        calls.append((backbone, size))
        return {"need_bytes": size * GIB // 8}

    monkeypatch.setattr(packing, "training_peak", fake_peak)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Stand-in GPU")
    monkeypatch.setattr(torch, "__version__", "2.9.0")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *a: type("P", (), {"total_memory": 80 * GIB}))
    monkeypatch.setattr(packing, "_run_on_a_gpu", lambda configs, cache, cpus: packing._measure(configs, cache))
    monkeypatch.setattr("ray.cluster_resources", lambda: {"CPU": 2.0, "GPU": 1.0})
    monkeypatch.setattr(packing, "_gpus_per_node", lambda: [])  # the GPUs' sizes: the measured one's only
    configs = [_config(size=64, model_id="a"), _config(size=64, model_id="b"), _config(size=128, model_id="c")]
    lines = []
    assert packing.fractions(configs, log=lines.append) == {"a": 1 / 8, "b": 1 / 8, "c": 0.25}
    assert sorted(calls) == [("test_resnet", 64), ("test_resnet", 128)]  # once per key, not per model
    assert ("gpu: auto on Stand-in GPU, torch 2.9.0 (80 GiB): test_resnet@128px/batch32/amp=True needs 16.00 GiB per fold "
            "(measured now): 4 fold(s) per GPU (gpu 0.25)") in lines
    cache = json.loads((tmp_path / "cache" / "gpu_memory.json").read_text())
    assert cache == {"Stand-in GPU, torch 2.9.0": {"test_resnet@64px/batch32/amp=True": 8 * GIB,
                                      "test_resnet@128px/batch32/amp=True": 16 * GIB}}
    lines.clear()
    assert packing.fractions(configs + [_config(size=32, model_id="d")], log=lines.append)["d"] == 0.0588  # 17 folds
    assert calls[2:] == [("test_resnet", 32)]  # only the new key was measured
    assert [line for line in lines if "(measured now)" in line] == [
        "gpu: auto on Stand-in GPU, torch 2.9.0 (80 GiB): test_resnet@32px/batch32/amp=True needs 4.00 GiB per fold "
        "(measured now): 17 fold(s) per GPU (gpu 0.0588)"]
    monkeypatch.setattr(torch, "__version__", "2.10.0")  # another torch: its own measurements
    packing.fractions(configs, log=lines.append)
    assert sorted(calls[3:]) == [("test_resnet", 64), ("test_resnet", 128)]


def test_fractions_fit_the_smallest_gpu_of_a_mixed_cluster(ray_cluster, monkeypatch):
    """Measured on an 80 GiB GPU, the cluster also has a 24 GiB one: a fraction holds wherever Ray places the fold.
    The sizes' task runs for real on every GPU node (here: logical GPUs, so it finds no CUDA device)."""
    assert ray_cluster.get(packing._gpus_per_node(), timeout=120) == [packing.node_gpus(4)]  # [] without CUDA
    sizes = [ray_cluster.put([{"name": "Big", "total": 80 * GIB}, {"name": "Small", "total": 24 * GIB}])]
    same = [ray_cluster.put([{"name": "Big", "total": 80 * GIB}])]  # the measured GPU's own size: named once
    monkeypatch.setattr(packing, "gpu_needs", lambda configs, cpus, log: (
        {"name": "Big, torch 2.9.0", "total": 80 * GIB}, {packing.key_of(configs[0]): 10 * GIB}, set()))
    monkeypatch.setattr(packing, "_gpus_per_node", lambda: same)
    lines = []
    assert packing.fractions([_config()], log=lines.append) == {"m": 0.1666}
    assert lines[0].startswith("gpu: auto on Big, torch 2.9.0 (80 GiB): ")
    monkeypatch.setattr(packing, "_gpus_per_node", lambda: sizes)
    lines = []
    assert packing.fractions([_config()], log=lines.append) == {"m": 0.5}  # floor(24 x 0.85 / 10) = 2; on 80 GiB: 6
    assert lines == ["gpu: auto on the cluster's smallest GPU, Small (24 GiB; measured on Big, torch 2.9.0 (80 GiB)): "
                     "test_resnet@32px/batch32/amp=True needs 10.00 GiB per fold: 2 fold(s) per GPU (gpu 0.5)"]
    lost = [ray_cluster.remote(lambda: os._exit(1)).options(max_retries=0).remote()]  # its node's worker died
    monkeypatch.setattr(packing, "_gpus_per_node", lambda: lost)
    lines = []
    assert packing.fractions([_config()], log=lines.append) == {"m": 0.1666}  # the measured GPU's packing
    assert lines[0].startswith("note: gpu: auto could not read the GPUs' sizes (")
    assert lines[1].startswith("note: gpu: auto found no CUDA device on 1 of the 1 GPU node(s) it asked; it packs as if")


@pytest.mark.slow
def test_logical_gpus_without_cuda_are_refused_before_anything_is_written(tmp_path, demo_dir, ray_cluster):
    path = small_space(tmp_path, demo_dir, rows=80, epochs=1, resources={"cpu": 0.5, "gpu": "auto"})
    run_dir = tmp_path / "runs" / "auto"
    with pytest.raises(UserError, match=r"needs a CUDA GPU to measure on, but the task Ray gave a GPU found none"):
        tune.run_sweep(spaces.load_space(str(path)), run_dir, verbose=0)
    assert not run_dir.exists()


@pytest.mark.slow
def test_each_model_trains_its_folds_at_its_measured_fraction(tmp_path, demo_dir, ray_cluster, monkeypatch, capsys):
    """Two backbones measured (here: given) at 40 and 20 GiB on a 100 GiB GPU: 2 and 4 folds per GPU."""
    needs = {"test_resnet@32px/batch32/amp=True": 40 * GIB, "test_efficientnet@32px/batch32/amp=True": 20 * GIB}
    monkeypatch.setattr(packing, "_run_on_a_gpu", lambda configs, cache, cpus: (
        {"name": "Stand-in GPU", "total": 100 * GIB}, {packing.key_of(c): needs[packing.key_of(c)] for c in configs}))
    monkeypatch.setattr(packing, "_gpus_per_node", lambda: [])  # the stand-in's size only, even on a CUDA machine
    monkeypatch.setenv("ENSEMBLE_CACHE_DIR", str(tmp_path / "cache"))
    path = small_space(tmp_path, demo_dir, rows=80, epochs=1, backbones=["test_resnet", "test_efficientnet"],
                       resources={"cpu": 0.25, "gpu": "auto"})
    run_dir = tmp_path / "runs" / "auto"
    board = tune.run_sweep(spaces.load_space(str(path)), run_dir, verbose=0)
    assert set(board["state"]) == {"complete"}
    shares = {m: {read_metrics(run_dir, m, k)["history"][0]["gpu"] for k in range(2)} for m in board["model_id"]}
    assert sorted(shares.values(), key=str) == [{0.25}, {0.5}]
    out = capsys.readouterr().out
    assert "test_resnet@32px/batch32/amp=True needs 40.00 GiB per fold (measured now): 2 fold(s) per GPU (gpu 0.5)" in out
    assert json.loads((tmp_path / "cache" / "gpu_memory.json").read_text())["Stand-in GPU"] == needs


def test_a_cache_of_another_shape_is_measured_again(tmp_path, monkeypatch):
    monkeypatch.setenv("ENSEMBLE_CACHE_DIR", str(tmp_path))
    for text, kept in (("[1, 2]", {}), ("not json", {}),
                       ('{"A": 5, "B": {"bad": "x", "zero": 0, "ok": 3}}', {"B": {"ok": 3}})):
        packing.cache_file().write_text(text)
        assert packing._read_cache() == kept
