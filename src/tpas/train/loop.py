"""The trainer: one code path for a laptop CPU and ``accelerate launch`` on many GPUs or nodes.

Run directory layout (``<out>``)::

    config.yaml            the resolved config
    log.jsonl              one JSON object per logged step / validation
    checkpoints/latest     name of the newest complete checkpoint (written last, atomically)
    checkpoints/step-N/    config.json + model.safetensors, trainer_state.pt (optimizer,
                           scheduler, scaler, step/epoch/batch position, best R@1), rng-<rank>.pt
    last/                  save_pretrained dir of the newest weights (create_model("<out>/last"))
    best/                  save_pretrained dir of the best validation R@1 (+ metrics.json)

A checkpoint is written into ``checkpoints/.tmp-step-N`` and renamed when complete, and
``latest`` is updated after the rename, so a crash at any moment leaves the previous checkpoint
usable. ``resume=True`` restores weights, optimizer, scheduler, scaler, every RNG and the position
in the epoch; with the deterministic data order of :mod:`tpas.data.loader` the resumed run ends
with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tpas.config import LossSection, TrainConfig, dump_config
from tpas.eval.metrics import Metrics
from tpas.errors import TpasError
from tpas.utils.io import write_text

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE_FILE = "trainer_state.pt"


# -- the per-batch objective ---------------------------------------------------------------------
class TrainStep(nn.Module):
    """Model + losses in one ``forward(batch) -> dict`` so DDP sees a single forward per step."""

    def __init__(self, model: nn.Module, loss: LossSection):
        super().__init__()
        self.model = model
        self.cfg = loss

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from tpas.train.losses import itc_loss, itm_loss, mlm_loss

        m, cfg = self.model, self.cfg
        img, txt = _encode_batch(m, batch)
        temp = m.temperature
        labels = batch["labels"]
        out: dict[str, torch.Tensor] = {}
        total = torch.zeros((), device=img.embeds.device)
        if cfg.itc > 0:
            out["itc"] = itc_loss(img.embeds, txt.embeds, temp, labels if cfg.same_id_positive else None,
                                  cfg.label_smoothing)
            total = total + cfg.itc * out["itc"]
        if cfg.itm > 0:
            extra = []
            rows = batch.get("hard_rows")
            if cfg.itm_hard_pairs and rows is not None and rows.numel() and "hard_images" in batch:
                hard_img = m.encode_image(batch["hard_images"]).tokens
                hard_txt = m.encode_text(batch["hard_input_ids"], batch["hard_attention_mask"])
                extra.append((img.tokens[rows], hard_txt.tokens, hard_txt.mask))  # image + other-behaviour caption
                extra.append((hard_img, txt.tokens[rows], txt.mask[rows]))  # other-behaviour image + caption
            sim = img.embeds.detach().float() @ txt.embeds.detach().float().t()
            partner = batch.get("partner") if cfg.itm_hard_pairs else None
            out["itm"], stats = itm_loss(m, img.tokens, txt.tokens, txt.mask, sim, labels, temp.detach(), extra,
                                         partner=partner)
            out["itm_acc"] = torch.tensor(stats["itm_acc"])
            if "itm_hard_acc" in stats:
                out["itm_hard_acc"] = torch.tensor(stats["itm_hard_acc"])
            total = total + cfg.itm * out["itm"]
        if cfg.mlm > 0:
            if "input_ids" not in batch:
                raise TpasError("loss.mlm needs token ids; it cannot train on cached text features "
                                "(set model.options.train_cache_views=0 or loss.mlm=0)")
            out["mlm"] = mlm_loss(m, img.tokens, batch["input_ids"], batch["attention_mask"], cfg.mlm_probability)
            total = total + cfg.mlm * out["mlm"]
        out["loss"] = total
        return out


def _encode_batch(model, batch: dict[str, torch.Tensor]):
    """(ImageEncoding, TextEncoding) of a batch: from pixels and ids, or from cached frozen features."""
    from tpas.train.cache import IMAGE_PREFIX, TEXT_PREFIX, split_batch

    if "images" in batch:
        img = model.encode_image(batch["images"])
    else:
        img = model.encode_image_from(split_batch(batch, IMAGE_PREFIX))
    if "input_ids" in batch:
        txt = model.encode_text(batch["input_ids"], batch["attention_mask"])
    else:
        txt = model.encode_text_from(split_batch(batch, TEXT_PREFIX), batch["attention_mask"])
    return img, txt


# -- RNG state -------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(obj):
    return tuple(_as_tuple(x) for x in obj) if isinstance(obj, (list, tuple)) else obj


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# -- the trainer -----------------------------------------------------------------------------------
class Trainer:
    """Builds everything from a :class:`TrainConfig`; :meth:`fit` runs to the end and returns ``out``."""

    def __init__(self, config: TrainConfig, resume: bool = False, trainset=None, cache_dir: str | Path | None = None,
                 cache_pool: bool = False):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        from tpas.models.registry import check_starting_weights

        self.config = cfg = config
        check_starting_weights(cfg.model.name, cfg.model.checkpoint, cfg.model.from_scratch)  # before any work
        tcfg = cfg.train
        if tcfg.threads > 0:
            torch.set_num_threads(tcfg.threads)
        cpu = tcfg.device == "cpu" or not torch.cuda.is_available()
        precision = tcfg.precision
        if precision == "auto":
            precision = "bf16" if not cpu and torch.cuda.is_bf16_supported() else "no"
        if precision not in ("no", "bf16", "fp16"):
            raise TpasError(f"train.precision must be auto, no, bf16 or fp16; got {precision!r}")
        self.accelerator = acc = Accelerator(
            cpu=cpu, mixed_precision=precision,
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=tcfg.find_unused_parameters)])
        self.rank, self.world = acc.process_index, acc.num_processes
        self.out = Path(tcfg.out or Path("runs") / cfg.name)
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
        # feature cache file (train_cache_views): next to the run, or a shared folder (benchmarks)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else self.out
        # cache_pool: cache every pair before data.select, so runs on different selections of one pool
        # share one cache file (benchmarks/select_ablation.py); a user's 1% of PAB caches only its 1%
        self.cache_pool = cache_pool
        self.cache_seconds = 0.0

        seed_everything(tcfg.seed)  # same on every rank: identical initial weights
        self.model = self._build_model()
        self._build_data(trainset)
        self._build_optim()
        self.step_module, self.optimizer = acc.prepare(TrainStep(self.model, cfg.loss), self.optimizer)
        seed_everything(tcfg.seed + 1000 * (self.rank + 1))  # per-rank dropout / negative sampling
        self.state: dict[str, Any] = {"step": 0, "epoch": 0, "batch": 0, "best_r1": -1.0, "best_step": -1}
        self.tb = None  # TensorBoard writer, opened by fit() when tensorboard is installed
        if resume:
            self._load_latest()
        elif acc.is_main_process and (self.out / CHECKPOINTS / LATEST).exists():
            log.warning("%s already holds checkpoints; starting over (pass --resume to continue)", self.out)

    # -- construction --------------------------------------------------------------------------
    def _build_model(self):
        from tpas.models import create_model

        mcfg = self.config.model
        model = create_model(mcfg.name, checkpoint=mcfg.checkpoint, device=self.accelerator.device,
                             seed=self.config.train.seed, **mcfg.options)  # new heads differ per train.seed
        if mcfg.train_text_layers is not None or mcfg.train_image_blocks is not None:
            if not hasattr(model, "set_trainable"):
                raise TpasError(f"model {mcfg.name!r} has no set_trainable: remove model.train_* options")
            text = mcfg.train_text_layers if mcfg.train_text_layers is not None else getattr(
                model.config, "train_text_layers", -1)
            image = mcfg.train_image_blocks if mcfg.train_image_blocks is not None else getattr(
                model.config, "train_image_blocks", -1)
            model.set_trainable(text, image)
        n_all = sum(p.numel() for p in model.parameters())
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log.info("model %s: %.1fM parameters, %.1fM trainable", mcfg.name, n_all / 1e6, n_train / 1e6)
        return model

    def _build_data(self, trainset) -> None:
        from tpas.data.loader import (Collator, PairDataset, ShardedBatchSampler, build_train_loader,
                                      identity_groups, label_map, split_by_identity, subsample, validation_set)
        from tpas.data.transforms import EvalTransform, TrainTransform

        cfg, dcfg = self.config, self.config.data
        if trainset is None:
            if not dcfg.root:
                raise TpasError("data.root is not set (the dataset directory)")
            from tpas.data.datasets import load_train

            trainset = load_train(dcfg.root, dcfg.format, on_bad_image=dcfg.on_bad_image, check_images=True)
        trainset = subsample(trainset, dcfg.max_pairs, cfg.train.seed)
        train_pairs, val_pairs = split_by_identity(trainset.pairs, dcfg.val_identities, cfg.train.seed)
        pool_pairs = train_pairs
        if dcfg.select:  # after the split: a selection never brings validation identities back
            from tpas.data.select import select_training_pairs

            train_pairs = select_training_pairs(train_pairs, dcfg.select, cfg.train.seed)
        self.root = Path(trainset.root)
        self.valset = validation_set(val_pairs, self.root, dcfg.val_max_queries) if val_pairs else None
        model = self.model
        size, mean, std = model.image_size, model.config.image_mean, model.config.image_std
        transform = TrainTransform(size, mean, std) if dcfg.augment else EvalTransform(size, mean, std)
        hard = dcfg.hard_pairs and cfg.loss.itm > 0 and cfg.loss.itm_hard_pairs
        views = int(getattr(model.config, "train_cache_views", 0) or 0)
        if views > 0:  # frozen tower bottoms computed once per image view / caption (tpas.train.cache)
            cached = pool_pairs if self.cache_pool else train_pairs
            self.dataset, collate, workers = self._cached_dataset(train_pairs, cached, transform, views)
        else:
            self.dataset = PairDataset(train_pairs, self.root, transform, label_map(train_pairs), cfg.train.seed,
                                       hard_pairs=hard, eda=dcfg.eda)
            collate, workers = Collator.for_model(model), dcfg.workers
        groups = identity_groups(train_pairs) if dcfg.group_batches else None
        similar = None
        if views > 0 and getattr(model.config, "train_similar_batches", False):  # half of each batch: look-alikes
            similar = self.dataset.group_vectors(groups or [[i] for i in range(len(self.dataset))])
        self.sampler = ShardedBatchSampler(len(self.dataset), cfg.train.batch_size, self.world, self.rank,
                                           cfg.train.seed, groups=groups, similar=similar)
        self.loader = build_train_loader(self.dataset, self.sampler, collate, workers,
                                         on_bad_image=dcfg.on_bad_image)
        accum = max(1, cfg.train.grad_accum)
        self.steps_per_epoch = len(self.sampler) // accum
        if self.steps_per_epoch == 0:
            raise TpasError(f"an epoch has {len(self.sampler)} batches, fewer than train.grad_accum={accum}")
        self.total_steps = cfg.train.max_steps or cfg.train.epochs * self.steps_per_epoch
        log.info("training on %d pairs (%d identities), %d steps of %d global samples (%d steps/epoch)",
                 len(train_pairs), len(self.dataset.labels), self.total_steps, self.global_batch, self.steps_per_epoch)

    def _cached_dataset(self, train_pairs, cached_pairs, transform, views: int):
        """(CachedPairDataset, its collate, 0 workers) over a feature cache of ``cached_pairs`` (a superset of
        ``train_pairs``) built (or loaded) now."""
        from tpas.data.loader import label_map
        from tpas.data.transforms import TrainTransform
        from tpas.train.cache import CachedCollator, CachedPairDataset, build_feature_cache

        cfg = self.config
        model = self.model
        if not hasattr(model, "frozen_image_features"):
            raise TpasError(f"model {cfg.model.name!r} cannot train from cached features (train_cache_views)")
        if cfg.data.eda > 0:
            raise TpasError("data.eda changes captions every epoch: it cannot train from cached text features")
        if cfg.loss.mlm > 0:
            raise TpasError("loss.mlm masks token ids: it cannot train from cached text features")
        if not isinstance(transform, TrainTransform):
            transform = TrainTransform(model.image_size, model.config.image_mean, model.config.image_std,
                                       flip=0.0, crop_scale=1.0, jitter=0.0, camera=None)
        start = time.perf_counter()
        cache = build_feature_cache(model, cached_pairs, self.root, views, cfg.train.seed, transform,
                                    batch_size=32,
                                    workers=max(1, cfg.data.workers), cache_dir=self.cache_dir,
                                    progress=self.accelerator.is_main_process and cfg.train.progress)
        self.cache_seconds = time.perf_counter() - start
        log.info("feature cache ready in %.1f s", self.cache_seconds)
        return CachedPairDataset(train_pairs, cache, label_map(train_pairs), cfg.train.seed), CachedCollator(cache), 0

    @property
    def global_batch(self) -> int:
        t = self.config.train
        return t.batch_size * self.world * max(1, t.grad_accum)

    def _build_optim(self) -> None:
        from tpas.train.optim import build_optimizer, build_scheduler

        t = self.config.train
        self.optimizer = build_optimizer(self.model, t.lr, t.weight_decay, t.lr_mult, t.betas, t.eps)
        self.scheduler = build_scheduler(self.optimizer, t.schedule, self.total_steps, t.warmup, t.min_lr_ratio,
                                         t.step_milestones, t.step_gamma)

    def _after_optimizer_step(self) -> None:
        """Keep the temperature parameter inside its bounds (in place, outside autograd; ALBEF/X-VLM)."""
        clamp = getattr(self.unwrapped, "clamp_temperature_", None)
        if clamp is not None:
            clamp()

    # -- checkpoints ---------------------------------------------------------------------------
    @property
    def unwrapped(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.step_module).model

    def _checkpoint(self) -> Path:
        acc = self.accelerator
        root = self.out / CHECKPOINTS
        name = f"step-{self.state['step']:08d}"
        tmp, final = root / f".tmp-{name}", root / name
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        torch.save(rng_state(), tmp / f"rng-{self.rank}.pt")
        acc.wait_for_everyone()
        if acc.is_main_process:
            self.unwrapped.save_pretrained(tmp)
            if self.config.train.debug_kill_at_step == self.state["step"]:
                log.warning("debug_kill_at_step: SIGKILL while checkpoint %s is half written", name)
                os.kill(os.getpid(), signal.SIGKILL)
            scaler = getattr(acc, "scaler", None)
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                        "scaler": scaler.state_dict() if scaler is not None else None,
                        "state": dict(self.state), "world_size": self.world}, tmp / STATE_FILE)
            _replace_dir(tmp, final)
            write_text(root / LATEST, name + "\n")
            self._export(final, self.out / "last")
            self._prune(root, keep=max(1, self.config.train.keep_checkpoints))
            log.info("checkpoint %s", final)
        acc.wait_for_everyone()
        return final

    @staticmethod
    def _export(checkpoint: Path, target: Path) -> None:
        """Copy the model files of a checkpoint into a save_pretrained dir, atomically."""
        from tpas.models.base import CONFIG_NAME, WEIGHTS_NAME

        tmp = target.parent / f".tmp-{target.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for fname in (CONFIG_NAME, WEIGHTS_NAME):
            shutil.copy2(checkpoint / fname, tmp / fname)
        _replace_dir(tmp, target)

    @staticmethod
    def _prune(root: Path, keep: int) -> None:
        done = sorted(p for p in root.glob("step-*") if p.is_dir())
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)

    def _load_latest(self) -> None:
        from safetensors.torch import load_file

        from tpas.models.base import WEIGHTS_NAME

        latest = self.out / CHECKPOINTS / LATEST
        if not latest.is_file():
            log.warning("--resume: no checkpoint under %s; starting from scratch", self.out)
            return
        ckpt = self.out / CHECKPOINTS / latest.read_text().strip()
        if not (ckpt / STATE_FILE).is_file():
            raise TpasError(f"{ckpt}: incomplete checkpoint (no {STATE_FILE})")
        self.unwrapped.load_state_dict(load_file(str(ckpt / WEIGHTS_NAME)))
        saved = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and saved.get("scaler"):
            scaler.load_state_dict(saved["scaler"])
        self.state.update(saved["state"])
        rng_file = ckpt / f"rng-{self.rank}.pt"
        if saved.get("world_size") != self.world or not rng_file.is_file():
            log.warning("resuming with %d processes from a %s-process checkpoint: data order is kept, "
                        "random streams are re-seeded", self.world, saved.get("world_size"))
            seed_everything(self.config.train.seed + 7919 * (self.state["step"] + 1) + self.rank)
        else:
            set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=True))
        if self.accelerator.is_main_process:
            _truncate_log(self.out / "log.jsonl", self.state["step"])
        log.info("resumed from %s (step %d, epoch %d, batch %d)", ckpt, self.state["step"], self.state["epoch"],
                 self.state["batch"])

    # -- validation ----------------------------------------------------------------------------
    def validate(self) -> Metrics | None:
        """Validation on the held-out training identities (main process only), through the same
        path as ``tpas eval`` (:func:`tpas.eval.run.run_eval`), so validation and test figures agree.

        Checkpoints are compared on what will be deployed: with ``val.calibrate_rerank`` = K > 0 (and
        an ITM loss), the R@1 of ITC top-K re-ranked by ITM at the fusion weight that is best on this
        split (:func:`tpas.search.calibrate.calibrate_on_evalset`); otherwise ITC R@1. The saved best
        model carries that weight, K and the gain over ITC alone (``rerank_weight/depth/gain``).
        """
        from tpas.eval.run import run_eval
        from tpas.search.calibrate import calibrate_ranking
        from tpas.search.ranking import rank_evalset

        acc = self.accelerator
        metrics = None
        if acc.is_main_process and self.valset is not None:
            model, k = self.unwrapped, self.config.val.calibrate_rerank
            k = k if self.config.loss.itm > 0 else 0
            with torch.random.fork_rng(devices=[]):
                # one encoding of the split: its full ITC matrix scores ITC alone, its head the re-rank
                ranking = rank_evalset(model, self.valset, rerank=k, depth=max(k, 10),
                                       batch_size=self.config.val.batch_size, progress=False)
                metrics = run_eval(model, self.valset, ranking=ranking.itc_only(), progress=False).metrics
                score, rerank = metrics["R@1"], None
                if k > 0:
                    weight, table = calibrate_ranking(ranking, self.valset)
                    score = table[weight]
                    rerank = {"depth": k, "weight": weight, "R@1": score, "gain": round(score - metrics["R@1"], 4),
                              "r1_by_weight": {str(w): r for w, r in table.items()}}
            improved = score > self.state["best_r1"]
            self._log({"step": self.state["step"], "epoch": self.state["epoch"], "val": metrics.to_dict(),
                       "val_rerank": rerank, "best": improved})
            log.info("validation at step %d: ITC R@1 %.2f R@5 %.2f mAP %.2f%s%s", self.state["step"], metrics["R@1"],
                     metrics["R@5"], metrics["mAP"],
                     "" if rerank is None else f"; + ITM top-{k} R@1 {score:.2f} (weight {rerank['weight']:g})",
                     " (best)" if improved else "")
            if improved:
                self.state["best_r1"], self.state["best_step"] = score, self.state["step"]
                config = model.config
                if rerank is not None:
                    config.rerank_weight, config.rerank_depth, config.rerank_gain = rerank["weight"], k, rerank["gain"]
                self._save_best(metrics, rerank)
        acc.wait_for_everyone()
        return metrics

    def _save_best(self, metrics: Metrics, rerank: dict | None = None) -> None:
        record = {"step": self.state["step"], "epoch": self.state["epoch"], **metrics.to_dict()}
        if rerank is not None:
            record["rerank_calibration"] = rerank
        self._write_best(self.unwrapped, record)

    def _write_best(self, model: nn.Module, metrics: dict[str, Any]) -> None:
        """Replace ``<out>/best`` with ``model`` and its ``metrics.json`` in one move (tmp dir + rename)."""
        from tpas.utils.io import write_json

        tmp = self.out / ".tmp-best"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        write_json(tmp / "metrics.json", metrics)
        _replace_dir(tmp, self.out / "best")

    # -- logging -------------------------------------------------------------------------------
    def _log(self, record: dict[str, Any]) -> None:
        if not self.accelerator.is_main_process:
            return
        record = {"time": round(time.time(), 3), **record}
        with open(self.out / "log.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("time", "step", "epoch"):
                    self.tb.add_scalar(f"train/{key}", value, record["step"])
            for key, value in (record.get("val") or {}).items():
                if isinstance(value, (int, float)):
                    self.tb.add_scalar(f"val/{key}", value, record["step"])

    def _open_tensorboard(self):
        if not self.accelerator.is_main_process:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.debug("tensorboard not installed: JSONL log only")
            return None
        return SummaryWriter(str(self.out / "tensorboard"))

    # -- the loop ------------------------------------------------------------------------------
    def fit(self) -> Path:
        from tqdm.auto import tqdm

        acc, cfg, t = self.accelerator, self.config, self.config.train
        self.tb = self._open_tensorboard()
        if acc.is_main_process:
            write_text(self.out / "config.yaml", dump_config(cfg))
        if cfg.val.at_start and self.state["step"] == 0 and cfg.val.every >= 0:
            self.validate()
        accum = max(1, t.grad_accum)
        per_epoch = self.steps_per_epoch * accum  # micro-batches used per epoch
        bar = tqdm(total=self.total_steps, initial=self.state["step"], desc="train", unit="step",
                   disable=not (acc.is_main_process and t.progress), dynamic_ncols=True)
        model = self.step_module
        model.train()
        tick, sps, running = time.perf_counter(), 0.0, {}
        while self.state["step"] < self.total_steps:
            epoch = self.state["epoch"]
            self.dataset.set_epoch(epoch)
            self.sampler.set_epoch(epoch, start=self.state["batch"])
            micro = 0
            for batch in self.loader:
                batch = {k: v.to(acc.device, non_blocking=True) for k, v in batch.items()}
                micro += 1
                sync = micro % accum == 0
                ctx = acc.no_sync(model) if not sync and self.world > 1 else contextlib.nullcontext()
                with ctx:
                    with acc.autocast():
                        losses = model(batch)
                    acc.backward(losses["loss"] / accum)
                for k, v in losses.items():
                    running[k] = running.get(k, 0.0) + float(v.detach()) / accum
                self.state["batch"] += 1
                if not sync:
                    continue
                group = self.optimizer.param_groups[0]
                lr = group["lr"] / group.get("lr_mult", 1.0)  # the base lr this step used
                grad_norm = None
                if t.grad_clip > 0:
                    grad_norm = float(acc.clip_grad_norm_(model.parameters(), t.grad_clip))
                self.optimizer.step()
                if getattr(acc, "optimizer_step_was_skipped", False):
                    # the fp16 loss scaler found inf/nan gradients and skipped the update: the
                    # schedule waits too (otherwise every skip silently shortens warm-up and decay)
                    log.info("step %d: fp16 loss scaler skipped the update; lr schedule held", self.state["step"] + 1)
                else:
                    self._after_optimizer_step()
                    self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.state["step"] += 1
                step = self.state["step"]
                now = time.perf_counter()
                sps = self.global_batch / max(now - tick, 1e-9)
                tick = now
                bar.update(1)
                bar.set_postfix(loss=f"{running['loss']:.3f}", lr=f"{lr:.2e}", sps=f"{sps:.1f}")
                if step % max(1, t.log_every) == 0 or step == self.total_steps:
                    rec = {"step": step, "epoch": epoch, **{k: round(v, 5) for k, v in running.items()},
                           "lr": lr, "temp": float(self.unwrapped.temperature.detach()), "samples_per_s": round(sps, 2)}
                    if grad_norm is not None:
                        rec["grad_norm"] = round(grad_norm, 4)
                    self._log(rec)
                running = {}
                epoch_end = self.state["batch"] >= per_epoch
                if epoch_end:
                    self.state["epoch"], self.state["batch"] = epoch + 1, 0
                last = step >= self.total_steps
                if cfg.val.every >= 0 and ((cfg.val.every > 0 and step % cfg.val.every == 0)
                                           or (cfg.val.every == 0 and epoch_end) or last):
                    self.validate()
                    tick = time.perf_counter()  # samples/s counts training only
                if (t.checkpoint_every > 0 and step % t.checkpoint_every == 0) or (
                        t.checkpoint_every == 0 and epoch_end) or last:
                    self._checkpoint()
                    tick = time.perf_counter()
                if epoch_end or last:
                    break
            self.optimizer.zero_grad(set_to_none=True)  # drop a partial accumulation at epoch end
        bar.close()
        if acc.is_main_process:
            if self.state["best_step"] < 0:
                log.warning("no validation ran (empty split or val.every<0): best/ is the last weights")
                self._export(self.out / CHECKPOINTS / (self.out / CHECKPOINTS / LATEST).read_text().strip(),
                             self.out / "best")
            self._calibrate_post()
            if self.tb is not None:
                self.tb.close()
        acc.wait_for_everyone()
        return self.out

    def _calibrate_post(self) -> None:
        """Store the query-set post-processing options validation picks in ``best/``, on the ranking the
        model will serve (ITM re-ranked at its validated depth when re-ranking gained on validation,
        else ITC): SCA's text threshold, rule, tau and compared score
        (:func:`tpas.search.calibrate.calibrate_sca`) and the assignment's depth, slack and compared
        score (:func:`tpas.search.calibrate.calibrate_assign`)."""
        from tpas.models import create_model
        from tpas.search.calibrate import calibrate_assign, calibrate_sca
        from tpas.search.ranking import rank_evalset

        best = self.out / "best"
        if self.valset is None or not (best / "config.json").is_file():
            return
        model = create_model(best, device=self.accelerator.device)
        config = model.config
        if config.sca_threshold is not None and config.assign_options is not None:
            return  # already calibrated (a resumed run that had finished)
        depth = config.rerank_depth if config.rerank_depth and (config.rerank_gain or 0) > 0 else 0
        targets = (self.valset.query_targets(), self.valset.gallery_targets())
        with torch.random.fork_rng(devices=[]):
            ranking = rank_evalset(model, self.valset, rerank=depth, depth=max(depth, 10),
                                   batch_size=self.config.val.batch_size, progress=False)
        sca_options, sca_record = calibrate_sca(ranking, *targets)
        assign_options, assign_record = calibrate_assign(ranking, *targets)
        config.sca_threshold = sca_options["threshold"]
        config.sca_options = {k: v for k, v in sca_options.items() if k != "threshold"}
        config.assign_options = assign_options
        metrics_file = best / "metrics.json"
        metrics = json.loads(metrics_file.read_text(encoding="utf-8")) if metrics_file.is_file() else {}
        record = _json_keys({"sca_calibration": {"rerank": depth, **sca_record},
                             "assign_calibration": {"rerank": depth, **assign_record}})
        self._write_best(model, {**metrics, **record})
        self._log({"step": self.state["step"], **record})


def _json_keys(value: Any) -> Any:
    """``value`` with every dict key a string (JSON objects cannot have float keys)."""
    if isinstance(value, dict):
        return {str(k): _json_keys(v) for k, v in value.items()}
    return value


def _replace_dir(src: Path, dst: Path) -> None:
    """Move directory ``src`` onto ``dst``; an existing ``dst`` is swapped out first, then removed."""
    old = None
    if dst.exists():
        old = dst.parent / f".old-{dst.name}-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from (they will be written again)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a line cut by the crash
    write_text(path, "".join(k + "\n" for k in kept))


def train(config: TrainConfig, resume: bool = False, trainset=None, cache_dir: str | Path | None = None,
          cache_pool: bool = False) -> Path:
    """Train (or resume) per ``config``; returns the run directory (``<out>/best``, ``<out>/last``, logs).

    ``trainset`` replaces reading ``config.data.root`` (tests, the demo); ``cache_dir`` and ``cache_pool``
    are :class:`Trainer`'s (where feature caches live; cache all pairs before ``data.select``).
    """
    from tpas.data.images import bad_image_policy

    with bad_image_policy(config.data.on_bad_image):  # validation's encoding follows the training policy
        return Trainer(config, resume=resume, trainset=trainset, cache_dir=cache_dir, cache_pool=cache_pool).fit()
