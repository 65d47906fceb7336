"""Train the boundary U-Net on one dataset with one loss, tracked in MLflow.

A run writes into outputs/boundaries/<dataset>-<loss>/:

    checkpoints/last.pt    written after each validation (every boundaries.eval_every epochs,
                           atomically): model, optimizer, RNG states,
                           epoch, history, params; `resume` goes on from it. At the end it
                           also holds "postprocess": the post-processing settings calibrated
                           on the validation split (boundaries.calibrate; see `calibrate`)
    snapshots/             test-image predictions, test grain diameters and per-image test scores
                           (epoch-NNN-scores.json) at the snapshot epochs
    history.csv            per-epoch curves (for `dvc plots`)
    metrics.json           final validation metrics and test metrics per snapshot (for DVC)
    loss_curve.png
    run.json               the MLflow run id (not a DVC output: `resume` continues that run)

On the CPU a run is deterministic: the same params and seed give the same weights,
with or without an interruption and `resume` in between. The DVC outputs hold nothing that
changes from one identical run to the next: epoch times and run ids go to MLflow and run.json.

Under torchrun (WORLD_SIZE > 1: `torchrun --nproc_per_node N -m grainlab boundaries train ...`)
each process trains its share of every batch, boundaries.batch_size being the global batch, with
DistributedDataParallel (`DistributedNet`); rank 0 alone validates, scores the test set, writes
the outputs and logs to MLflow. On the CPU, N processes give the weights of one process that
splits each batch in N parts (`cpu_parallel`).
"""

from __future__ import annotations

import atexit
import csv
import functools
import io
import json
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from grainlab import tracking
from grainlab.boundaries.calibrate import calibrate_postprocess, postprocess_dict
from grainlab.boundaries.calibrate import truth_maps as reference_truths
from grainlab.boundaries.cpu_parallel import SplitBatch, cpu_parts
from grainlab.boundaries.data import CropDataset, CropSampler, build_augmentation, load_pairs
from grainlab.boundaries.evaluate import (
    model_probability,
    model_tracer,
    postprocess_settings,
    score_items,
    summarise,
)
from grainlab.boundaries.grains import equivalent_diameters, label_grains, trace_boundaries
from grainlab.boundaries.infer import (
    LoadedModel,
    mixed_precision,
    pick_device,
    predict_logits,
    read_checkpoint,
    trains_channels_last,
    uses_bf16,
)
from grainlab.boundaries.losses import make_loss
from grainlab.boundaries.metrics import boundary_scores, partition_scores
from grainlab.boundaries.unet import ChannelDropout, UNetArgs, build_unet
from grainlab.config import BoundaryConfig, Params, flatten, to_dict
from grainlab.datasets.folder import load_dataset, load_test_set, split_by_region
from grainlab.errors import GrainlabError
from grainlab.images import (
    atomic_path,
    ensure_writable,
    parallel_map,
    worker_threads,
    write_bytes,
    write_image,
    write_json,
    write_mask,
)

OUTPUT_ROOT = Path("outputs/boundaries")
RUN_FILE = "run.json"
MODEL_LOGGED_TAG = "pyfunc_model_logged"


class TrainingDiverged(GrainlabError):
    pass


@dataclass(frozen=True)
class TrainResult:
    out_dir: Path
    run_id: str
    history: list[dict]
    metrics: dict


def dataset_root(params: Params, dataset: str) -> Path:
    """A dataset name under data/grain_boundaries/, or a path to a dataset folder."""
    path = Path(dataset)
    if (path / "manifest.json").is_file():
        return path
    root = Path(params.data.root) / params.boundaries.datasets_dir / dataset
    if not (root / "manifest.json").is_file():
        raise GrainlabError(
            f"dataset {dataset!r}: no manifest.json at {root} (nor at {path}); run `grainlab data synth`, "
            "`grainlab data import`, or pass a dataset folder"
        )
    return root


def test_items(params: Params) -> list:
    """The held-out test set (its first boundaries.test_max_images), or [] when it has not been made."""
    cfg = params.boundaries
    root = Path(params.data.root) / cfg.datasets_dir / cfg.test_set
    items = load_test_set(root) if (root / "manifest.json").is_file() else []
    return items[: cfg.test_max_images] if cfg.test_max_images else items


def set_determinism(seed: int, device: torch.device):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    else:
        torch.use_deterministic_algorithms(True, warn_only=True)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def save_checkpoint(path: Path, state: dict):
    """Write a checkpoint atomically (temp file, then rename).

    It is serialised in memory first: torch's own file writer reports a full disk as a bare
    RuntimeError, a plain file write raises the OSError that names the problem.
    """
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_bytes(path, buffer.getbuffer())


def _rng_state(sampler: CropSampler) -> dict:
    state = {"torch": torch.get_rng_state(), "sampler": sampler.generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state: dict, sampler: CropSampler):
    torch.set_rng_state(state["torch"])
    sampler.generator.set_state(state["sampler"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _check_resume_params(saved: dict, params: Params, path: Path):
    now, before = flatten(params), flatten(saved)
    allowed = {
        "boundaries.epochs",
        "boundaries.snapshot_epochs",
        "boundaries.workers",
        "boundaries.eval_every",
        "boundaries.compile",
    }
    changed = sorted(k for k in set(now) | set(before) if k not in allowed and now.get(k) != before.get(k))
    if changed:
        diffs = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed[:5])
        raise GrainlabError(
            f"{path}: cannot resume, the params differ from the checkpoint's ({diffs}); only "
            "boundaries.epochs, snapshot_epochs, workers, eval_every and compile may change. Train afresh without --resume."
        )


def torchrun_ranks() -> tuple[int, int]:
    """(rank, world size) of this process among torchrun's; (0, 1) without torchrun (WORLD_SIZE
    unset or 1). Under torchrun the first call joins the process group, left at exit: nccl, each
    process on the GPU of its LOCAL_RANK, or gloo on the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        atexit.register(dist.destroy_process_group)
    return dist.get_rank(), world


def rank_batch_size(cfg: BoundaryConfig, n_samples: int, world: int) -> int:
    """Each of `world` processes' share of the global batch (boundaries.batch_size). Both the
    batch and the samples per epoch must split evenly, so that every process takes equal parts."""
    if cfg.batch_size % world:
        raise GrainlabError(
            f"boundaries.batch_size = {cfg.batch_size}: expected a multiple of the {world} torchrun "
            "processes (WORLD_SIZE); it is the global batch, split among them"
        )
    if n_samples % world:
        raise GrainlabError(
            f"boundaries.samples_per_epoch = {cfg.samples_per_epoch} ({n_samples} crops per epoch): "
            f"expected a multiple of the {world} torchrun processes (WORLD_SIZE)"
        )
    return cfg.batch_size // world


class DistributedNet:
    """Trains `net` as process `rank` of `world` under torchrun, as `cpu_parallel.SplitBatch`
    trains it with each batch split among threads: the process gets its part of every global
    batch (`CropSampler`) and DistributedDataParallel averages the parts' gradients (equal parts:
    the batch's loss gradient). BatchNorm normalises each part with its own statistics, as most
    DDP training does on GPUs: no SyncBatchNorm, which has no CPU kernel and would make a run
    differ from the 1-process run that splits its batches (the CPU test's reference). The running
    statistics and the epoch's losses are averaged over the processes at the end of each epoch
    (`end_epoch`; running statistics are linear in the batch statistics, so this equals averaging
    them at every step, up to rounding). Each process's dropout draws from its own generator,
    seeded from torch's global one, which stays the same in every process (a checkpoint's RNG
    state is rank 0's).

    While rank 0 validates, checkpoints and logs, the other processes wait in the next epoch's
    first gradient all-reduce (or, after the last epoch, in `rank_zero_result`)."""

    def __init__(self, net: nn.Module, rank: int, world: int, compile_: bool):
        self.net, self.rank, self.world = net, rank, world
        ddp = DistributedDataParallel(net, forward_sync_buffers=False)
        self.module = torch.compile(ddp) if compile_ else ddp
        self.generator = torch.Generator(next(net.parameters()).device)
        for module in net.modules():
            if isinstance(module, ChannelDropout):
                module.generator = self.generator

    def train(self, mode: bool = True) -> DistributedNet:
        self.module.train(mode)
        return self

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, loss_fn, device) -> torch.Tensor:
        """This process's part of the batch: its loss (detached); the batch's mean gradients are
        added to the parameters' .grad."""
        seeds = [int(torch.randint(2**62, ())) for _ in range(self.world)]
        self.generator.manual_seed(seeds[self.rank])
        return forward_backward(self.module, x, y, loss_fn, device)

    def end_epoch(self, losses: torch.Tensor) -> torch.Tensor:
        """The per-step losses averaged over the processes (the batches' losses); averages the
        running statistics (BatchNorm's) over the processes too."""
        with torch.no_grad():
            for buffer in self.net.buffers():
                if buffer.is_floating_point():
                    dist.all_reduce(buffer)
                    buffer.div_(self.world)
        dist.all_reduce(losses)
        return losses / self.world


def training_network(cfg: BoundaryConfig, device: torch.device, rank: int = 0, world: int = 1):
    """(net, train_net, optimizer): the U-Net on the device (channels-last where
    `trains_channels_last`), what trains it and its Adam. What trains it shares net's weights:
    under torchrun (world > 1) a `DistributedNet` of net; else net itself, net torch.compile'd
    (boundaries.compile), or on a multi-core CPU a `SplitBatch` of net (see `cpu_parallel`)."""
    net = build_unet(UNetArgs(**to_dict(cfg.unet))).to(device)
    if trains_channels_last(device):
        net = net.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    if world > 1:
        return net, DistributedNet(net, rank, world, cfg.compile), optimizer
    if cfg.compile:
        return net, torch.compile(net), optimizer
    parts = cpu_parts(device, cfg.batch_size)
    return net, (SplitBatch(net, parts) if parts > 1 else net), optimizer


def crop_loader(
    dataset: CropDataset, sampler: CropSampler, batch_size: int, workers: int, device: torch.device, seed: int
) -> DataLoader:
    """Batches of augmented crops; worker processes persist across epochs, pinned memory on CUDA."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(seed),
    )


def forward_backward(net: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn, device) -> torch.Tensor:
    """The batch's loss (detached); its gradients are added to the parameters' .grad."""
    with mixed_precision(device):
        logits = net(x)
    loss = loss_fn(logits.float(), y)
    loss.backward()
    return loss.detach()


def train_epoch(net, loader, loss_fn, optimizer, device, epoch: int) -> float:
    """One pass over the loader; the mean training loss. Losses stay on the device until the end
    of the epoch (no per-step host sync, so the GPU never waits on Python), then the first
    non-finite one, if any, is reported with its step. `net` is what `training_network` returns."""
    net.train()
    split = isinstance(net, SplitBatch | DistributedNet)
    step = net.forward_backward if split else functools.partial(forward_backward, net)
    channels_last = trains_channels_last(device)
    losses, sizes = [], []
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        optimizer.zero_grad(set_to_none=True)
        losses.append(step(x, y, loss_fn, device))
        optimizer.step()
        sizes.append(len(x))
    if not losses:
        return float("nan")
    losses = torch.stack(losses).float()
    if isinstance(net, DistributedNet):
        losses = net.end_epoch(losses)
    losses = losses.cpu()
    bad = (~torch.isfinite(losses)).nonzero()
    if len(bad):
        step = int(bad[0])
        raise TrainingDiverged(
            f"training diverged: loss = {losses[step].item()} at epoch {epoch}, step {step}; "
            "lower boundaries.lr or choose another loss"
        )
    return float((losses * torch.tensor(sizes)).sum() / sum(sizes))


def truth_maps(samples, post) -> list[tuple[np.ndarray, np.ndarray]]:
    """(tracing, grains) of each validation tracing, post-processed as predictions are."""

    def truth(sample):
        tracing = trace_boundaries(sample[1].astype(np.float32), post)
        return tracing, label_grains(tracing, post)

    return parallel_map(truth, samples)


def validate(model: LoadedModel, samples, truths, loss_fn, params: Params) -> dict[str, float]:
    """Validation loss and tracing metrics over whole validation images. Each image is
    post-processed and scored in a worker thread while the network predicts the next."""
    cfg = params.boundaries
    post = postprocess_settings(cfg)
    model.net.eval()

    def score(logits, truth):
        tracing = trace_boundaries(1 / (1 + np.exp(-np.clip(logits, -50, 50))), post)
        return {
            **boundary_scores(tracing, truth[0], cfg.tolerance_px),
            **partition_scores(label_grains(tracing, post), truth[1]),
        }

    losses, pending = [], []
    with ThreadPoolExecutor(worker_threads(len(samples))) as pool:
        for (image, mask), truth in zip(samples, truths, strict=True):
            chw = image.astype(np.float32)
            logits = predict_logits(
                model,
                np.moveaxis(chw, 0, 2) if chw.shape[0] == 3 else chw[0],
                cfg.tile_px,
                cfg.tile_overlap,
                cfg.tile_batch,
            )
            target = torch.from_numpy(mask[None, None].astype(np.float32))
            losses.append(loss_fn(torch.from_numpy(logits[None, None]), target).item())
            pending.append(pool.submit(score, logits, truth))
        rows = [p.result() for p in pending]
    out = {"val/loss": float(np.mean(losses))}
    for key in (
        "boundary_f1",
        "boundary_precision",
        "boundary_recall",
        "vi",
        "vi_split",
        "vi_merge",
        "adapted_rand",
    ):
        out[f"val/{key}"] = float(np.mean([r[key] for r in rows]))
    return out


def write_snapshot(
    model: LoadedModel, params: Params, items: list, out_dir: Path, epoch: int
) -> dict[str, float]:
    """Score the test set at this epoch. Writes into snapshots/ the prediction of the held-out
    test image (probability and tracing PNGs) and the equivalent diameter of every grain
    traced in the test set (grain-diameters CSV: the study's size distributions)."""
    cfg = params.boundaries
    shown = items[min(cfg.test_image, len(items) - 1)]
    snapshots = out_dir / "snapshots"
    diameters = {}

    def keep(item, result):
        diameters[item.name] = equivalent_diameters(result.grains)
        if item is shown:
            write_image(snapshots / f"epoch-{epoch:03d}-probability.png", result.probability)
            write_mask(snapshots / f"epoch-{epoch:03d}-tracing.png", result.tracing)

    channels = "rgb" if model.in_channels == 3 else "grey"
    rows = score_items(model_tracer(model, cfg), items, channels, cfg.tolerance_px, keep)
    write_json(snapshots / f"epoch-{epoch:03d}-scores.json", rows)
    with atomic_path(snapshots / f"epoch-{epoch:03d}-grain-diameters.csv") as tmp, open(tmp, "w") as f:
        f.write("image,diameter_px\n")
        f.writelines(f"{item.name},{d:.3f}\n" for item in items for d in diameters[item.name])
    return {f"test/{k}": v for k, v in summarise(rows).items()}


def snapshot_rows(out_dir: Path, epoch: int) -> list[dict]:
    """The per-image test scores (`score_items` rows) of a run at a snapshot epoch."""
    path = Path(out_dir) / "snapshots" / f"epoch-{epoch:03d}-scores.json"
    if not path.is_file():
        raise GrainlabError(
            f"{path}: not found; the run in {out_dir} did not keep its per-image test scores, train it again"
        )
    return json.loads(path.read_text())


def snapshot_diameters(out_dir: Path, epoch: int) -> np.ndarray:
    """The equivalent diameters (px) of the test grains a run traced at a snapshot epoch."""
    path = Path(out_dir) / "snapshots" / f"epoch-{epoch:03d}-grain-diameters.csv"
    if not path.is_file():
        raise GrainlabError(
            f"{path}: not found; the run in {out_dir} did not keep its test grain sizes, train it again"
        )
    return np.loadtxt(path, delimiter=",", skiprows=1, usecols=1, ndmin=1)


def write_history(out_dir: Path, history: list[dict]):
    keys = sorted({k for row in history for k in row}, key=lambda k: (k != "epoch", k))
    with atomic_path(out_dir / "history.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(history)


def train_boundaries(
    params: Params,
    dataset: str,
    loss: str | None = None,
    *,
    resume: bool = False,
    out_root: Path = OUTPUT_ROOT,
    log_model: bool = True,
    experiment: str = tracking.BOUNDARY_EXPERIMENT,
    run_name: str | None = None,
    parent_run_id: str | None = None,
    run_tags: dict | None = None,
    on_epoch=None,
    on_run=None,
    regions=None,
) -> TrainResult:
    """Train one (dataset, loss) run; see the module docstring for what it writes.

    on_run(run_id) is called once the MLflow run exists, on_epoch(epoch, metrics) after each
    epoch (an Optuna trial reports and prunes there); parent_run_id nests the run. regions, if
    given, restricts the dataset to the pairs of these regions (sources) before the split
    (cross-validation trains on its training folds only).

    With boundaries.calibrate the post-processing of the last epoch's weights is calibrated on
    the validation split: the settings that maximise the mean boundary F1 there
    (`calibrate.calibrate_postprocess`) go into the last checkpoint under "postprocess" and
    are logged as `calibrated/*` metrics and `postprocess.*` tags.

    Under torchrun every process calls this, and every one returns rank 0's result; the others
    only train (see the module docstring).
    """
    rank, world = torchrun_ranks()
    cfg = params.boundaries
    loss = loss or cfg.loss
    loss_fn = make_loss(loss, **cfg.loss_args.get(loss, {}))
    ds = load_dataset(dataset_root(params, dataset))
    pairs = ds.pairs if regions is None else [p for p in ds.pairs if p.region in set(regions)]
    train_pairs, val_pairs = split_by_region(pairs, cfg.val_fraction, params.seed)
    if cfg.val_max_images:  # spread over the validation regions
        val_pairs = val_pairs[:: max(1, len(val_pairs) // cfg.val_max_images)][: cfg.val_max_images]
    batch_size = rank_batch_size(cfg, cfg.samples_per_epoch or len(train_pairs), world)
    out_dir = Path(out_root) / f"{ds.name}-{loss}"
    ckpt_path = out_dir / "checkpoints" / "last.pt"
    if rank == 0:
        ensure_writable(ckpt_path.parent)  # an unwritable output folder fails now, not after an epoch
    else:
        val_pairs = []  # rank 0 validates
    items = test_items(params)

    device = pick_device()
    set_determinism(params.seed, device)
    max_px = params.data.max_image_pixels
    train_samples = load_pairs(train_pairs, cfg.unet.in_channels, max_px)
    val_samples = load_pairs(val_pairs, cfg.unet.in_channels, max_px)
    val_truths = truth_maps(val_samples, postprocess_settings(cfg))
    net, train_net, optimizer = training_network(cfg, device, rank, world)
    sampler = CropSampler(len(train_samples), cfg.samples_per_epoch, params.seed, cfg.batch_size, rank, world)
    dataset = CropDataset(train_samples, cfg.crop_px, build_augmentation(cfg.augment))
    loader = crop_loader(dataset, sampler, batch_size, cfg.workers, device, params.seed)

    history: list[dict] = []
    start_epoch, run_id, calibrated = 1, None, None
    if resume:
        ckpt = read_checkpoint(ckpt_path)
        _check_resume_params(ckpt["params"], params, ckpt_path)
        net.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        _restore_rng(ckpt["rng"], sampler)
        history, start_epoch = list(ckpt["history"]), ckpt["epoch"] + 1
        run_id = read_run_id(out_dir) if rank == 0 else None
    if rank > 0:
        for epoch in range(start_epoch, cfg.epochs + 1):
            train_epoch(train_net, loader, loss_fn, optimizer, device, epoch)
        return rank_zero_result(None)
    model = LoadedModel(net, device, to_dict(params), 0)
    tags = {
        **tracking.standard_tags(
            dataset=ds.name,
            loss=loss,
            device=device_name(device),
            precision="bf16 autocast" if uses_bf16(device) else "fp32",
            batch_parts=len(train_net.replicas) if isinstance(train_net, SplitBatch) else world,
            stage="boundary-train",
        ),
        **(run_tags or {}),
    }
    run_params = {
        **flatten(params),
        "dataset": ds.name,
        "loss": loss,
        "train_pairs": len(train_pairs),
        "val_pairs": len(val_pairs),
    }
    with tracking.run(
        experiment,
        run_name=run_name or f"{ds.name}-{loss}",
        run_id=run_id,
        params=run_params,
        tags=tags,
        parent_run_id=parent_run_id,
        dataset=(ds.name, ds.root),
    ) as active:
        run_id = active.info.run_id
        if on_run is not None:
            on_run(run_id)
        for epoch in range(start_epoch, cfg.epochs + 1):
            start = time.perf_counter()
            row = {
                "epoch": epoch,
                "train/loss": train_epoch(train_net, loader, loss_fn, optimizer, device, epoch),
            }
            evaluate = epoch % cfg.eval_every == 0 or epoch in cfg.snapshot_epochs or epoch == cfg.epochs
            if evaluate:
                row.update(validate(model, val_samples, val_truths, loss_fn, params))
            if epoch in cfg.snapshot_epochs and items:
                row.update(write_snapshot(model, params, items, out_dir, epoch))
            history.append(row)
            seconds = {"time/epoch_s": time.perf_counter() - start}
            tracking.log_metrics({k: v for k, v in row.items() if k != "epoch"} | seconds, step=epoch)
            if not evaluate:
                continue
            new_run_file = (
                read_run_id(out_dir) != run_id
            )  # with the first checkpoint: the run `resume` continues
            if new_run_file:
                write_json(out_dir / RUN_FILE, {"run_id": run_id})
            if epoch == cfg.epochs and cfg.calibrate and val_samples:  # the final weights' post-processing
                calibrated = calibrate_model(model, val_samples, params)
            try:
                save_checkpoint(
                    ckpt_path,
                    {
                        "model_args": net.args.to_dict(),
                        "model": net.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "rng": _rng_state(sampler),
                        "epoch": epoch,
                        "history": history,
                        "params": to_dict(params),
                        "dataset": ds.name,
                        "loss": loss,
                        **(
                            {"postprocess": calibrated[0], "postprocess_calibration": calibrated[1]}
                            if calibrated
                            else {}
                        ),
                    },
                )
            except Exception:  # e.g. a full disk: leave no run file without its checkpoint
                if new_run_file:
                    (out_dir / RUN_FILE).unlink(missing_ok=True)
                raise
            if on_epoch is not None:
                on_epoch(epoch, row)
        metrics = final_metrics(history, cfg.snapshot_epochs)
        if calibrated:
            tracking.set_tags({f"postprocess.{k}": v for k, v in calibrated[0].items()})
            metrics.update({f"calibrated/{k}": v for k, v in calibrated[1].items()})
            tracking.log_metrics({f"calibrated/{k}": v for k, v in calibrated[1].items()})
        write_outputs(out_dir, history, metrics, f"{ds.name} / {loss}")
        if (out_dir / "snapshots").is_dir():
            tracking.log_artifacts(out_dir / "snapshots", "snapshots")
        for name in ("loss_curve.png", "history.csv", "metrics.json"):
            tracking.log_artifact(out_dir / name)
        if log_model and not tracking.active_tags().get(MODEL_LOGGED_TAG):  # once, also on --resume
            from grainlab.serving import log_boundary_model

            log_boundary_model(ckpt_path)
            tracking.set_tags({MODEL_LOGGED_TAG: "true"})
    return rank_zero_result(TrainResult(out_dir, run_id, history, metrics))


def rank_zero_result(result: TrainResult | None) -> TrainResult:
    """Rank 0's result, in every torchrun process (the others wait here for rank 0 to finish)."""
    if not dist.is_initialized():
        return result
    box = [result]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _hwc(chw: np.ndarray) -> np.ndarray:
    """A loaded (C, H, W) sample image as the (H, W) or (H, W, 3) float32 image inference takes."""
    chw = chw.astype(np.float32)
    return np.moveaxis(chw, 0, 2) if chw.shape[0] == 3 else chw[0]


def calibrate_model(model: LoadedModel, samples, params: Params) -> tuple[dict, dict]:
    """(settings, report): the post-processing calibrated on the validation samples
    (`calibrate.calibrate_postprocess`, maximising the mean boundary F1)."""
    cfg = params.boundaries
    model.net.eval()
    probs = [model_probability(model, _hwc(image), cfg) for image, _ in samples]
    truths = reference_truths([s[1] for s in samples])
    post, report = calibrate_postprocess(
        probs, truths, postprocess_settings(cfg), cfg.tolerance_px, cfg.calibrate_objective
    )
    return postprocess_dict(post), report


# settings that change only how a trained network's output is used, not the network
INFERENCE_KEYS = ("boundaries.postprocess", "boundaries.tta", "boundaries.calibrate", "boundaries.tile_")
# (boundaries.postprocess_from and boundaries.calibrate_objective start with these too)


def check_reusable(params: Params, ckpt_path: Path):
    """Raise unless the checkpoint was trained with these params (the seed and the boundaries
    section, which is all that training reads), but for INFERENCE_KEYS."""
    now, before = flatten(params), flatten(read_checkpoint(ckpt_path)["params"])
    changed = sorted(
        k
        for k in set(now) | set(before)
        if (k == "seed" or k.startswith("boundaries."))
        and not k.startswith(INFERENCE_KEYS)
        and now.get(k) != before.get(k)
    )
    if changed:
        raise GrainlabError(
            f"{ckpt_path}: cannot reuse, the params differ from the checkpoint's in {', '.join(changed[:5])}; "
            "only post-processing and inference settings may change"
        )


def recalibrate(params: Params, dataset: str, ckpt_path: Path, regions=None) -> dict:
    """Calibrate the post-processing of a finished run again, with these params' inference
    settings (border band, test-time augmentation), on the validation split it trained with,
    and store it in its checkpoint; returns the calibration's report. The params may differ
    from the checkpoint's only in INFERENCE_KEYS (the split and the weights stay the same)."""
    cfg = params.boundaries
    check_reusable(params, ckpt_path)
    ds = load_dataset(dataset_root(params, dataset))
    pairs = ds.pairs if regions is None else [p for p in ds.pairs if p.region in set(regions)]
    _, val_pairs = split_by_region(pairs, cfg.val_fraction, params.seed)
    if cfg.val_max_images:
        val_pairs = val_pairs[:: max(1, len(val_pairs) // cfg.val_max_images)][: cfg.val_max_images]
    samples = load_pairs(val_pairs, cfg.unet.in_channels, params.data.max_image_pixels)
    from grainlab.boundaries.infer import load_model

    settings, report = calibrate_model(load_model(ckpt_path, pick_device()), samples, params)
    ckpt = read_checkpoint(ckpt_path)
    ckpt["postprocess"], ckpt["postprocess_calibration"] = settings, report
    save_checkpoint(ckpt_path, ckpt)
    return report


def read_run_id(out_dir: Path) -> str | None:
    """The MLflow run of a run folder (run.json), or None when it has none (a new run is started)."""
    path = Path(out_dir) / RUN_FILE
    try:
        return json.loads(path.read_text())["run_id"]
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):
        raise GrainlabError(f"{path}: not a run file; expected JSON with a run_id") from None


def load_result(out_dir: Path) -> TrainResult:
    """A finished run's result, read back from its output folder (e.g. a DVC stage's outputs)."""
    ckpt = read_checkpoint(Path(out_dir) / "checkpoints" / "last.pt")
    metrics_path = Path(out_dir) / "metrics.json"
    if not metrics_path.is_file():
        raise GrainlabError(f"{metrics_path}: not found; the run in {out_dir} did not finish")
    return TrainResult(
        Path(out_dir), read_run_id(out_dir), list(ckpt["history"]), json.loads(metrics_path.read_text())
    )


def final_metrics(history: list[dict], snapshot_epochs) -> dict:
    """The last epoch's validation metrics plus the test metrics at each snapshot epoch."""
    last = history[-1]
    out = {k: v for k, v in last.items() if k.startswith(("val/", "train/"))}
    out["epochs"] = last["epoch"]
    for row in history:
        if row["epoch"] in snapshot_epochs:
            out.update(
                {f"test_e{row['epoch']:03d}/{k[5:]}": v for k, v in row.items() if k.startswith("test/")}
            )
    return out


def write_outputs(out_dir: Path, history: list[dict], metrics: dict, title: str):
    from grainlab.boundaries.figures import write_loss_curve

    write_history(out_dir, history)
    write_json(out_dir / "metrics.json", metrics)
    write_loss_curve(out_dir / "loss_curve.png", history, title)
