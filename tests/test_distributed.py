"""common/distributed.py: one process as before; two gloo processes under torchrun train like one.

The two-process checks run this file as a torchrun script (``main`` below) on the toy set of
tests/test_training.py: one epoch of the image path and one of the cached-trunk path, then a
sharded extraction; each rank saves what it ended with, and the tests compare.
"""
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
N_EMBED = 23  # an odd number of images: the two shares differ in size


def test_without_torchrun_everything_is_one_process(monkeypatch):
    from common import distributed
    from common.runtime import resolve_device
    from common.samplers import DistributedPKSampler, PKSampler

    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    distributed.init("cpu")
    assert not torch.distributed.is_initialized()
    assert (distributed.world_size(), distributed.rank(), distributed.is_main(), distributed.is_distributed()) == (1, 0, True, False)
    distributed.barrier()
    rows = np.arange(6.0).reshape(3, 2)
    assert distributed.shard([1, 2, 3]) == [1, 2, 3] and distributed.broadcast({"stop": 1}) == {"stop": 1}
    assert distributed.gather(rows) is rows and distributed.mean({"loss": 2.0}) == {"loss": 2.0}
    module = torch.nn.Linear(2, 2)
    assert distributed.wrap(module, "cpu") is module
    labels = np.repeat(np.arange(5), [1, 2, 3, 5, 4])
    assert list(DistributedPKSampler(labels, 3, 2, seed=1, flip=True)) == list(PKSampler(labels, 3, 2, seed=1, flip=True))
    assert resolve_device("cpu") == torch.device("cpu")


def test_under_torchrun_cuda_is_this_ranks_gpu_and_sync_bn_needs_one(monkeypatch, tmp_path):
    from common import training
    from common.config import ConfigError
    from common.runtime import resolve_device
    from test_training import tiny_member, toy_frame

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0) and resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="train.sync_bn needs CUDA"):
        training.setup_run(tiny_member(sync_bn=True), toy_frame(tmp_path, n_ids=2, per_id=2), None, torch.device("cpu"))


def test_lr_find_refuses_torchrun(monkeypatch, tmp_path):
    from common import lr_finder
    from common.config import ConfigError

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="--lr-find runs in one process"):
        lr_finder.lr_find({}, None, tmp_path / "lr.png")


def _torchrun(args: list, nproc: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node nproc args`` from the project root, one thread per
    process (as torchrun sets it), a Python and C++ stack on a crash. A run that a signal ended
    (a rank aborted) is retried once with a warning carrying its log: CI once saw rank 1 of the
    toy run die of SIGABRT with no message that this machine ever reproduced."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1", TORCH_SHOW_CPP_STACKTRACES="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if res.returncode != 0 and "Signal " in res.stderr:
        warnings.warn(f"torchrun {' '.join(map(str, args[:1]))}: a rank died of a signal; retrying once.\n{_failure(res)}")
        res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return res


def _failure(res: subprocess.CompletedProcess) -> str:
    """What the ranks printed, the ranks' own errors last (CI shows the tail): torchrun's summary
    of which rank failed comes first, then the stderr before it, where a crash prints its stack."""
    cut = res.stderr.find("Traceback (most recent call last):\n  File \"<frozen runpy>\"")
    ranks, summary = (res.stderr[:cut], res.stderr[cut:]) if cut > 0 else (res.stderr, "")
    return f"stdout:\n{res.stdout[-2000:]}\ntorchrun:\n{summary[-1500:]}\nranks' stderr:\n{ranks[-4000:]}"


def _launch(out: Path, data: Path, nproc: int) -> float:
    """Run :func:`main` in ``nproc`` processes (plain python for 1, torchrun for more); wall seconds."""
    t0 = time.time()
    if nproc > 1:
        res = _torchrun([__file__, str(out), str(data)], nproc)
    else:
        env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
        env["OMP_NUM_THREADS"] = "1"  # one thread per process, as torchrun sets it: 1 process = 1 core
        res = subprocess.run([sys.executable, __file__, str(out), str(data)], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=600)
    assert res.returncode == 0, f"{nproc} process(es) failed:\n{_failure(res)}"
    return time.time() - t0


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from test_training import toy_frame

    data = tmp_path_factory.mktemp("toy")
    toy_frame(data / "img").to_csv(data / "train.csv", index=False)
    out1, out2 = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    t1, t2 = _launch(out1, data, 1), _launch(out2, data, 2)
    print(f"\ntoy set, 2 fits of 1 epoch + extraction: 1 process {t1:.1f} s, 2 gloo processes (torchrun) {t2:.1f} s")
    return data, out1, out2


@pytest.mark.parametrize("path", ["plain", "cached"])
def test_two_ranks_take_the_steps_of_one_process_and_end_with_identical_weights(runs, path):
    from common.models import load_checkpoint

    data, out1, out2 = runs
    one = torch.load(out1 / f"rank0_{path}.pt", weights_only=False)
    r0, r1 = (torch.load(out2 / f"rank{r}_{path}.pt", weights_only=False) for r in (0, 1))
    assert one["steps"] == r0["steps"] == r1["steps"] == one["batches"] > 0, "same global batch, same steps"
    for k, v in r0["model"].items():
        assert torch.equal(v, r1["model"][k]), f"model weight {k} differs between the ranks"
    assert torch.equal(r0["head"]["weight"], r1["head"]["weight"]), "ArcFace head differs between the ranks"
    for name in ("best.pt", "last.pt"):
        model, ckpt = load_checkpoint(out2 / path / name)
        assert ckpt["step"] == one["steps"] and ckpt["classes"] == [f"w{i}" for i in range(6)]
    _, last = load_checkpoint(out2 / path / "last.pt")
    assert all(torch.equal(v, r0["model"][k]) for k, v in last["model"].items()), "rank 0 saved what it trained"
    assert [h["epoch"] for h in last["history"]] == [0, 1]
    assert (out2 / path / "history.csv").exists() and (out2 / path / "curves.png").exists()


def test_the_sampler_gives_each_rank_other_identities_and_covers_every_one(runs):
    import pandas as pd

    data, _, out2 = runs
    labels = pd.read_csv(data / "train.csv")["Id"].str[1:].astype(int).to_numpy()
    per_rank = [torch.load(out2 / f"rank{r}_plain.pt", weights_only=False)["keys"] for r in (0, 1)]
    assert len(per_rank[0]) == len(per_rank[1])
    for a, b in zip(*per_rank):
        assert a and b and not {labels[i] for i, _, _ in a} & {labels[i] for i, _, _ in b}, "disjoint identities per step"
    seen = {i for keys in per_rank for batch in keys for i, _, _ in batch}
    assert seen == set(range(len(labels))) and {labels[i] for i in seen} == set(labels), "every image and identity"


def test_sharded_extraction_gives_the_embeddings_of_one_process_in_order(runs):
    import pandas as pd

    from common.inference import embed_images
    from common.models import load_checkpoint

    data, _, out2 = runs
    paths = list(pd.read_csv(data / "train.csv")["path"][:N_EMBED])
    model, _ = load_checkpoint(out2 / "plain" / "best.pt")
    alone = embed_images(model, paths, 48, batch_size=8, tta_hflip=True, progress=False)
    sharded = np.load(out2 / "emb.npy")
    assert sharded.shape == alone.shape == (N_EMBED, 16)
    np.testing.assert_allclose(sharded, alone, atol=1e-5)


def test_stage04_in_two_gloo_processes_then_05_06_write_a_valid_submission(tmp_path):
    """Stage 04 as `make 04 NPROC=2` runs it, then stages 05 and 06 as usual: the submission validates."""
    import pandas as pd

    from common.models import load_checkpoint
    from common.submission import read_image_submission, validate_image_submission
    from test_stage05_06 import OVERRIDES, build_competition, stage

    paths = build_competition(tmp_path)
    args = ["04_train_embed.py", "--raw", str(paths.raw), "--data", str(paths.data), "--config", "tiny"]
    for o in OVERRIDES + ["train.baseline=false"]:
        args += ["--set", o]
    res = _torchrun(args)
    assert res.returncode == 0, f"stage 04 under torchrun failed:\n{_failure(res)}"
    assert res.stdout.count(f"wrote {paths.members_summary}") == 1, "rank 0 alone prints"
    summary = pd.read_json(paths.members_summary, typ="series")["members"]
    for name, entry in summary.items():
        _, ckpt = load_checkpoint(entry["ckpt"])
        assert ckpt["epoch"] == 1 and len(ckpt["classes"]) == 8, name
    for script, extra in (("05_pseudo_label.py", ["--set", "pseudo.enabled=false"]), ("06_ensemble_submit.py", [])):
        out = stage(script, paths, *extra)
        assert out.returncode == 0, f"{script}: {out.stderr[-3000:]}"
    tests = sorted(p.name for p in (paths.raw / "test").iterdir())
    db = pd.read_csv(paths.clean_train_csv)["Image"].tolist() + pd.read_csv(paths.clean_test_csv)["Image"].tolist()
    validate_image_submission(read_image_submission(paths.submission_csv), tests, db, k=20)


def main(out: Path, data: Path) -> None:
    """What every rank runs: two one-epoch fits (image path, cached-trunk path), then an extraction."""
    import pandas as pd

    sys.path.insert(0, str(ROOT))
    from common import distributed, training
    from common.inference import embed_images
    from common.models import load_checkpoint
    from common.samplers import PKSampler
    from test_training import tiny_member

    runs = []
    setup_run = training.setup_run

    def keep_run(*args, **kwargs):  # the Run of each fit, to save this rank's weights and batches
        runs.append(setup_run(*args, **kwargs))
        return runs[-1]

    training.setup_run = keep_run
    df = pd.read_csv(data / "train.csv")
    val = df.assign(is_query=[int(j % 2 == 0) for j in range(len(df))])
    for path, extra in (("plain", {}), ("cached", dict(trainable_blocks=1, cache_trunk=True, cache_views=2))):
        member = tiny_member(epochs=1, P=4, K=2, **extra)
        member["model"]["pretrained"] = "none"
        training.fit(member, df, val, out / path, device="cpu", progress=False)
        run = runs[-1]
        run.sampler.set_epoch(0)
        torch.save({"model": run.model.state_dict(), "head": run.loss_fn.head.state_dict(), "steps": run.step,
                    "keys": list(run.sampler), "batches": len(PKSampler(run.labels, 4, 2, seed=int(member["seed"]), flip=run.flip))},
                   out / f"rank{distributed.rank()}_{path}.pt")
    model, _ = load_checkpoint(out / "plain" / "best.pt")
    emb = embed_images(model, list(df["path"][:N_EMBED]), 48, batch_size=8, tta_hflip=True, progress=False)
    if distributed.is_main():
        np.save(out / "emb.npy", emb)
    training.setup_run = setup_run
    runs.clear()  # the DDP models hold the process group: free them before distributed.destroy at exit


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
