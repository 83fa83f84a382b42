"""Trainer end to end on lite-tiny and a tiny PAB-format dataset: config, loader determinism,
a single-process run, SIGKILL + resume = uninterrupted, and 2 processes (gloo) under accelerate."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from tpas.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
PERSONS = 12


def make_tiny_pab(root: Path, persons: int = PERSONS) -> Path:
    """PAB layout: each person has a normal and an anomaly pair pointing at each other (hard_i)."""
    rows = []
    for p in range(persons):
        colour = ((p * 53) % 256, (p * 97 + 40) % 256, (p * 151 + 80) % 256)
        for b, (folder, verb) in enumerate((("goal", "walks calmly"), ("full", "falls down"))):
            img = Image.new("RGB", (16, 32), colour)
            for y in range(0, 32, 4 if b else 8):  # behaviour = stripe pattern
                for x in range(16):
                    img.putpixel((x, y), (255, 255, 255))
            rel = f"imgs_0/{folder}/{p}.jpg"
            (root / "train" / "imgs_0" / folder).mkdir(parents=True, exist_ok=True)
            img.save(root / "train" / rel)
            other = f"imgs_0/{'full' if b == 0 else 'goal'}/{p}.jpg"
            rows.append({"image": "train/" + rel, "caption": f"person number {p} in colour {p % 5} {verb}",
                         "image_id": f"0_{2 * p + b}", "hard_i": other,
                         "hard_c": f"person number {p} in colour {p % 5} {'falls down' if b == 0 else 'walks calmly'}",
                         "hard_i_id": f"0_{2 * p + 1 - b}"})
    ann = root / "annotation" / "train"
    ann.mkdir(parents=True, exist_ok=True)
    (ann / "pair_0.json").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def tiny_pab(tmp_path_factory) -> Path:
    return make_tiny_pab(tmp_path_factory.mktemp("tiny_pab"))


def write_config(path: Path, root: Path, out: Path, **train) -> Path:
    opts = {"batch_size": 4, "max_steps": 8, "checkpoint_every": 3, "threads": 1, "progress": False,
            "log_every": 1, "lr": 1e-3, "warmup": 2, "grad_clip": 1.0, **train}
    lines = ["model:", "  name: lite-tiny", "data:", f"  root: {root}", "  val_identities: 3",
             "  eda: 0.3", "loss:", "  label_smoothing: 0.1", "train:", f"  out: {out}"]
    lines += [f"  {k}: {json.dumps(v)}" for k, v in opts.items()]
    lines += ["val:", "  every: 0", "  batch_size: 8"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _env(**extra) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.update(extra)
    return env


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "last" / "model.safetensors"))


def test_config_overrides_and_errors(tmp_path):
    cfg_path = write_config(tmp_path / "c.yaml", tmp_path, tmp_path / "run")
    cfg = load_config(cfg_path, ["train.lr=1e-4", "train.lr_mult={fusion.*: 5}", "model.options.embed_dim=16"])
    assert cfg.train.lr == pytest.approx(1e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.lr_mult == {"fusion.*": 5.0} and cfg.model.options == {"embed_dim": 16}
    assert cfg.name == "c" and cfg.train.batch_size == 4
    with pytest.raises(ConfigError, match=r"train: unknown key\(s\) \['lrate'\]"):
        load_config(cfg_path, ["train.lrate=1"])
    with pytest.raises(ConfigError, match="train.batch_size: expected int"):
        load_config(cfg_path, ["train.batch_size=four"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="bad.yaml:.*invalid YAML"):
        load_config(bad)


def test_sampler_is_deterministic_sharded_and_resumable():
    from tpas.data.loader import ShardedBatchSampler

    full = ShardedBatchSampler(20, 4, world_size=1, seed=3)
    full.set_epoch(1)
    batches = list(full)
    assert len(batches) == 5 and sorted(i for b in batches for i in b) == list(range(20))
    assert batches != list(ShardedBatchSampler(20, 4, seed=3))  # epoch 0 differs
    full.set_epoch(1, start=2)
    assert list(full) == batches[2:]
    ranks = [ShardedBatchSampler(20, 2, world_size=2, rank=r, seed=3) for r in range(2)]
    for r in ranks:
        r.set_epoch(1)
    merged = [a + b for a, b in zip(*[list(r) for r in ranks])]
    assert merged == batches
    with pytest.raises(ValueError, match="cannot fill one global batch"):
        ShardedBatchSampler(3, 4)
    grouped = ShardedBatchSampler(20, 4, seed=3, groups=[[2 * i, 2 * i + 1] for i in range(10)])
    for batch in grouped:  # partners stay together
        assert all(batch[k] // 2 == batch[k + 1] // 2 for k in range(0, 4, 2))
    with pytest.raises(ValueError, match="partition"):
        ShardedBatchSampler(4, 2, groups=[[0, 1], [1, 2]])


def test_dataset_items_repeat_per_epoch_and_index(tiny_pab):
    from tpas.data.datasets import load_train
    from tpas.data.loader import PairDataset
    from tpas.data.transforms import TrainTransform

    ts = load_train(tiny_pab, "pab")
    ds = PairDataset(ts.pairs, ts.root, TrainTransform((32, 16), (0.5,) * 3, (0.5,) * 3), seed=1,
                     hard_pairs=True, eda=0.5)
    a, b = ds[3], ds[3]
    assert torch.equal(a["image"], b["image"]) and a["caption"] == b["caption"]
    assert a["hard_image"] is not None and "falls down" in a["hard_caption"] + a["caption"]
    ds.set_epoch(1)
    assert not torch.equal(ds[3]["image"], a["image"])


@pytest.fixture(scope="module")
def reference_run(tiny_pab, tmp_path_factory) -> Path:
    """One uninterrupted in-process run (8 steps, checkpoints every 3), shared by two tests."""
    from tpas.train import train

    tmp = tmp_path_factory.mktemp("ref")
    threads = torch.get_num_threads()
    try:
        out = train(load_config(write_config(tmp / "ref.yaml", tiny_pab, tmp / "run")))
    finally:
        torch.set_num_threads(threads)
    assert out == tmp / "run"
    return out


def test_single_process_training_writes_loadable_best_and_last(reference_run):
    from tpas.models import create_model

    out = reference_run
    logs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in logs if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))
    assert all(r["loss"] > 0 and "itc" in r and "itm" in r and r["samples_per_s"] > 0 for r in steps)
    assert steps[0]["lr"] < steps[1]["lr"]  # warmup
    vals = [r for r in logs if "val" in r]
    assert [r["step"] for r in vals] == [4, 8]  # 18 training pairs / batch 4 = 4 steps per epoch
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-00000008"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-00000006", "step-00000008"]
    best = json.loads((out / "best" / "metrics.json").read_text())
    # checkpoints are compared on the deployed pipeline: ITC top-16 re-ranked by ITM at the weight
    # validation picked (not on ITC alone)
    full = [r["val_rerank"]["R@1"] for r in vals]
    assert best["rerank_calibration"]["R@1"] == max(full)
    # validation measured the saved weights on the identities carved out of training, via tpas eval's path
    from tpas.data.datasets import load_train
    from tpas.data.loader import split_by_identity, validation_set
    from tpas.eval.run import run_eval

    cfg = load_config(out.parent / "ref.yaml")
    train_pairs, val_pairs = split_by_identity(load_train(cfg.data.root, "pab").pairs, cfg.data.val_identities,
                                               cfg.train.seed)
    assert len({p.image for p in val_pairs}) == 6 and not {p.image for p in val_pairs} & {p.image for p in train_pairs}
    valset = validation_set(val_pairs, Path(cfg.data.root))
    for saved, logged in (("last", [r for r in vals if r["step"] == 8][0]["val"]),
                          ("best", [r for r in vals if r["best"]][-1]["val"])):
        again = run_eval(create_model(out / saved), valset, progress=False).metrics
        assert {k: again[k] for k in ("R@1", "R@5", "mAP")} == pytest.approx({k: logged[k] for k in ("R@1", "R@5", "mAP")})
    best_model = create_model(out / "best")
    assert best_model.config.embed_dim == 32
    calib = best["rerank_calibration"]  # fusion weight picked on the validation split, carried by the model
    assert calib["depth"] == 16 and best_model.config.rerank_weight == calib["weight"]
    assert best_model.config.rerank_depth == 16 and best_model.config.rerank_gain == calib["gain"]
    assert calib["r1_by_weight"][str(calib["weight"])] == max(calib["r1_by_weight"].values()) == calib["R@1"]
    assert calib["gain"] == pytest.approx(calib["R@1"] - best["R@1"])
    sca = best["sca_calibration"]  # SCA's options, picked on the same split after training
    assert best_model.config.sca_threshold == sca["options"]["threshold"]
    assert {"threshold": best_model.config.sca_threshold, **best_model.config.sca_options} == sca["options"]
    assert sca["r1"] == max(sca["seed"]["r1"], sca["margin"]["r1"])  # the better rule is what was stored
    if sca["options"]["rule"] == "margin":
        assert (sca["options"]["tau"], sca["options"]["threshold"]) == (sca["margin"]["tau"], sca["margin"]["threshold"])
    assign = best["assign_calibration"]  # and the assignment's depth, slack and compared score
    assert best_model.config.assign_options == assign["options"]
    assert assign["options"]["k"] in (1, 2, 3, 5, 10, 16) and assign["r1"] >= assign["before"]  # 1: no change
    last = create_model(out / "last")
    trained = _weights(out)
    assert all(torch.equal(v, trained[k]) for k, v in last.state_dict().items())


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run(tiny_pab, reference_run, tmp_path):
    """A run SIGKILLed while writing its step-6 checkpoint resumes from step 3 and ends bit-identical
    to the uninterrupted reference run (same config, in-process)."""
    cfg = write_config(tmp_path / "kill.yaml", tiny_pab, tmp_path / "kill")
    cmd = [sys.executable, "-m", "tpas.cli", "train", "--config"]
    killed = subprocess.run(cmd + [str(cfg), "train.debug_kill_at_step=6"], env=_env(), capture_output=True,
                            text=True, timeout=120)
    assert killed.returncode == -9, killed.stdout + killed.stderr
    ckpts = tmp_path / "kill" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step-00000003"
    assert (ckpts / ".tmp-step-00000006").is_dir()  # the half-written one, never pointed at
    resumed = subprocess.run(cmd + [str(cfg), "--resume"], env=_env(), capture_output=True, text=True,
                             timeout=120)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from" in resumed.stderr and "step 3" in resumed.stderr
    a, b = _weights(reference_run), _weights(tmp_path / "kill")
    assert a.keys() == b.keys()
    diff = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    assert diff == 0.0, f"resumed weights differ by {diff}"
    logged = [json.loads(x)["step"] for x in (tmp_path / "kill" / "log.jsonl").read_text().splitlines()
              if "loss" in json.loads(x)]
    assert logged == list(range(1, 9))  # lines after step 3 from the killed run were dropped


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TWO_PROC_SCRIPT = r"""
import json, sys
import torch, torch.nn.functional as F
from safetensors.torch import save_file
from tpas.config import load_config
from tpas.train.loop import Trainer
from tpas.train.losses import itc_loss

cfg_path, out = sys.argv[1], sys.argv[2]
trainer = Trainer(load_config(cfg_path))
trainer.fit()
rank, world = trainer.rank, trainer.world
state = {k: v.detach().contiguous().clone() for k, v in trainer.unwrapped.state_dict().items()}
save_file(state, f"{out}/rank{rank}.safetensors")
g = torch.Generator().manual_seed(0)
img = F.normalize(torch.randn(8, 16, generator=g), dim=1)
txt = F.normalize(torch.randn(8, 16, generator=g), dim=1)
ids = torch.tensor([0, 0, 1, 2, 3, 3, 4, 5])
part = slice(rank * 4, rank * 4 + 4)
li, lt = img[part].clone().requires_grad_(), txt[part].clone().requires_grad_()
temp = torch.tensor(0.07, requires_grad=True)
loss = itc_loss(li, lt, temp, ids[part], label_smoothing=0.1)
loss.backward()
json.dump({"world": world, "loss": loss.item(), "grad_img": li.grad.tolist(), "grad_temp": temp.grad.item()},
          open(f"{out}/itc{rank}.json", "w"))
"""


@pytest.mark.slow
def test_two_processes_gloo_stay_in_sync_and_itc_equals_single_process(tiny_pab, tmp_path):
    import torch.nn.functional as F

    from tpas.train.losses import itc_loss

    script = tmp_path / "two.py"
    script.write_text(TWO_PROC_SCRIPT, encoding="utf-8")
    cfg = write_config(tmp_path / "c.yaml", tiny_pab, tmp_path / "run", batch_size=2, max_steps=4,
                       checkpoint_every=0)
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, str(script), str(cfg), str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT,
                              env=_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE="2", RANK=str(r),
                                       LOCAL_RANK=str(r), LOCAL_WORLD_SIZE="2"))
             for r in range(2)]
    outs = [p.communicate(timeout=180)[0].decode() for p in procs]
    for p, text in zip(procs, outs):
        assert p.returncode == 0, text[-4000:]

    from safetensors.torch import load_file

    from tpas.models import create_model

    w0, w1 = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))

    init = create_model("lite-tiny", seed=42).state_dict()  # what training with train.seed=42 starts from
    params = [k for k in w0 if "running" not in k and "num_batches" not in k]
    assert all(torch.equal(w0[k], w1[k]) for k in params), "ranks diverged"
    assert any(not torch.equal(w0[k], init[k]) for k in params), "nothing trained"

    r0, r1 = (json.loads((tmp_path / f"itc{r}.json").read_text()) for r in range(2))
    assert r0["world"] == 2
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(8, 16, generator=g), dim=1).requires_grad_()
    txt = F.normalize(torch.randn(8, 16, generator=g), dim=1)
    temp = torch.tensor(0.07, requires_grad=True)
    single = itc_loss(img, txt, temp, torch.tensor([0, 0, 1, 2, 3, 3, 4, 5]), label_smoothing=0.1)
    single.backward()
    assert r0["loss"] == pytest.approx(single.item(), rel=1e-5)
    assert r1["loss"] == pytest.approx(single.item(), rel=1e-5)
    # the gather's backward keeps each rank's own rows (X-VLM's AllGather): every rank holds its slice
    # of the single-process gradient (DDP's averaging then halves it: tests/test_ddp_gradients.py)
    grads = torch.tensor(r0["grad_img"] + r1["grad_img"])
    assert torch.allclose(grads, img.grad, atol=1e-5)
    assert r0["grad_temp"] == pytest.approx(temp.grad.item(), rel=1e-4)


def test_cli_reports_bad_config_in_one_line(tmp_path, capsys):
    from tpas.cli import main

    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.yaml: config file not found" in err[0]
    cfg = write_config(tmp_path / "c.yaml", tmp_path, tmp_path / "run")
    assert main(["train", "--config", str(cfg), "loss.itx=1"]) == 2
    assert "unknown key(s) ['itx']" in capsys.readouterr().err


def test_grad_accum_without_validation_exports_last_as_best(tiny_pab, tmp_path):
    from tpas.train import train

    threads = torch.get_num_threads()
    try:
        cfg = load_config(write_config(tmp_path / "c.yaml", tiny_pab, tmp_path / "run", batch_size=2,
                                       grad_accum=2, max_steps=3, checkpoint_every=0),
                          ["val.every=-1", "data.group_batches=true", "loss.itm_hard_pairs=false"])
        out = train(cfg)
    finally:
        torch.set_num_threads(threads)
    logs = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs if "loss" in r] == [1, 2, 3] and not any("val" in r for r in logs)
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-00000003"
    from safetensors.torch import load_file

    best = load_file(str(out / "best" / "model.safetensors"))
    assert all(torch.equal(v, _weights(out)[k]) for k, v in best.items())


def test_gradient_accumulation_equals_the_large_batch(tiny_pab, tmp_path, monkeypatch):
    """2 micro-batches of 4 with grad_accum=2 end with the weights of 1 batch of 8, for a per-sample loss.

    (In-batch ITC and ITM negatives differ by construction: a micro-batch contrasts only its own
    samples. So the objective here is a per-sample one; what is tested is the accumulation itself:
    scaling, when the optimizer and scheduler step, clipping, the data each step sees.)
    """
    from tpas.train import train
    from tpas.train.loop import TrainStep

    def per_sample_loss(self, batch):
        img = self.model.encode_image(batch["images"]).embeds
        txt = self.model.encode_text(batch["input_ids"], batch["attention_mask"]).embeds
        loss = (1 - (img * txt).sum(-1)).mean()  # each sample's term depends on that sample only
        return {"loss": loss}

    monkeypatch.setattr(TrainStep, "forward", per_sample_loss)
    runs = {}
    for name, batch_size, accum in (("large", 8, 1), ("accum", 4, 2), ("small", 4, 1)):
        cfg = write_config(tmp_path / f"{name}.yaml", tiny_pab, tmp_path / name, batch_size=batch_size,
                           grad_accum=accum, max_steps=2, checkpoint_every=0, warmup=0)
        overrides = ["data.val_identities=0", "data.eda=0", "val.every=-1", "val.calibrate_rerank=0",
                     # no dropout, and a frozen CNN (BatchNorm statistics would depend on the batch size)
                     "model.options.dropout=0", "model.train_image_blocks=0"]
        runs[name] = _weights(train(load_config(cfg, overrides)))
    changed = [k for k in runs["large"] if not torch.equal(runs["large"][k], runs["small"][k])]
    assert changed  # batches of 4 without accumulation train differently: the comparison has power
    for key, value in runs["large"].items():
        torch.testing.assert_close(runs["accum"][key], value, atol=2e-6, rtol=1e-5)


def test_the_schedule_waits_while_the_fp16_scaler_skips_steps(tiny_pab, tmp_path, monkeypatch):
    """A step whose update the loss scaler skipped (inf/nan gradients) must not advance warm-up/decay."""
    import accelerate

    from tpas.train import train

    cfg = load_config(write_config(tmp_path / "c.yaml", tiny_pab, tmp_path / "run", max_steps=4, checkpoint_every=0),
                      ["val.every=-1", "val.calibrate_rerank=0"])
    threads = torch.get_num_threads()
    try:
        out = train(cfg)
        monkeypatch.setattr(accelerate.Accelerator, "optimizer_step_was_skipped", property(lambda self: True))
        skipped = train(load_config(write_config(tmp_path / "s.yaml", tiny_pab, tmp_path / "skip", max_steps=4,
                                                 checkpoint_every=0), ["val.every=-1", "val.calibrate_rerank=0"]))
    finally:
        torch.set_num_threads(threads)

    def lrs(run: Path) -> list[float]:
        return [r["lr"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "loss" in r]

    assert len(set(lrs(out))) > 1  # warm-up then decay when every update happens
    assert len(set(lrs(skipped))) == 1  # held at the first step's value while every update is skipped
