"""Assertions and small builders shared by the test modules (pytest puts tests/ on the path: pyproject's
``pythonpath``); fixtures are in conftest.py. Test modules import what they share from here, never from one
another.

Sections: assertions; torch threads; tiny EDM runs and sweeps; FID weights; Stable Diffusion LoRAs; EDM-style
network pickles; the sharded audit; CIFAR-10 archives. conftest.py imports this module in every session, so torch,
and the sdmem modules that import it, are imported inside the functions that need them.
"""

import collections
import contextlib
import functools
import hashlib
import io
import pickle
import socket
import struct
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import yaml

from sdmem.errors import InputError, SdmemError

ROOT = Path(__file__).resolve().parents[1]  # the repository: the folder above tests/


# -------------------------------------------------------------------------------------------------------- assertions


def raises(fn, where: str, *problem: str) -> InputError:
    """fn() must raise an InputError whose location contains `where` and whose message contains each `problem`."""
    with pytest.raises(InputError) as info:
        fn()
    assert where in info.value.where, info.value
    for p in problem:
        assert p in info.value.problem, info.value
    return info.value


class CliResult:
    """What one ``sdmem`` command gave: its exit code, stdout and stderr (see the ``cli`` fixture)."""

    def __init__(self, code: int, out: str, err: str):
        self.code, self.out, self.err = code, out, err

    def one_line_error(self, *words: str) -> None:
        """Exit 2, exactly one line on stderr (no traceback) that contains every word."""
        lines = [line for line in self.err.splitlines() if line.strip()]
        assert self.code == 2, (self.code, self.err)
        assert len(lines) == 1 and "Traceback" not in self.err, self.err
        for w in words:
            assert w in lines[0], (w, lines[0])


# ----------------------------------------------------------------------------------------------------- torch threads


@contextlib.contextmanager
def pinned_threads(n: int = 1):
    """torch on ``n`` threads inside the block (tiny nets on a shared 2-core machine: more only add contention)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------ tiny EDM runs and sweeps


TINY_EDM = """
kind: edm
out_dir: {out}
seed: 3
data: {{source: builtin:digits, size: 32, num_classes: 2, labels: {labels}}}
model: {{arch: ddpmpp, precond: edm, channels: 8, channel_mult: [1, 2], num_blocks: 1, attn_resolutions: [],
        dropout: 0.1}}
train: {{epochs: {epochs}, batch_size: 16, warmup_epochs: 2, ema_rate: 0.9, snapshot_epochs: 4,
        checkpoint_epochs: 2, log_every_steps: 2}}
track: {{num_images: {track}, batch: 16, steps: 4}}
"""


def write_tiny_edm(tmp: Path, name: str = "run", *, labels: str = "none", epochs: int = 8, track: int = 0) -> Path:
    """TINY_EDM filled in as ``tmp/NAME.yaml`` (its out_dir: ``tmp/NAME``); the config's path."""
    path = tmp / f"{name}.yaml"
    path.write_text(TINY_EDM.format(out=tmp / name, labels=labels, epochs=epochs, track=track))
    return path


# The sweep tests' tiny EDM spec (also used by the FID and failure check-lists).
BASE = {"kind": "edm", "seed": 3,
        "data": {"source": "builtin:digits", "size": 32, "num_classes": 2, "labels": "none"},
        "model": {"arch": "ddpmpp", "precond": "edm", "channels": 8, "channel_mult": [1, 2], "num_blocks": 1,
                  "attn_resolutions": [], "dropout": 0.1},
        "train": {"epochs": 8, "batch_size": 16, "warmup_epochs": 2, "ema_rate": 0.9, "snapshot_epochs": 4,
                  "checkpoint_epochs": 2, "log_every_steps": 2},
        "track": {"batch": 16, "steps": 3}}


def write_spec(tmp_path, name="spec.yaml", **over):
    """A sweep spec over BASE (data.size crossed with data.labels zipped to model.channels: 4 points) written as
    ``tmp_path/NAME``; ``over`` replaces top-level keys. The spec's path."""
    spec = {"out_dir": str(tmp_path / "sweep"), "base": BASE, "axes": {"data.size": [16, 32]},
            "zip": [{"data.labels": ["none", "true"], "model.channels": [8, 16]}], "generate": {"num": 8},
            "report": "best", **over}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


# ------------------------------------------------------------------------------------------------------- FID weights


def random_state_dict(seed: int = 0) -> dict:
    """Inception-v3 weights of the right keys and shapes, randomly initialised (He-normal convolutions)."""
    import math

    import torch

    from sdmem import fid

    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in fid.expected_shapes().items():
        if key.endswith("conv.weight"):
            fan_in = shape[1] * shape[2] * shape[3]
            out[key] = torch.randn(shape, generator=g) * math.sqrt(2 / fan_in)
        elif key.endswith(("bn.weight", "running_var")):
            out[key] = torch.ones(shape)
        elif key.endswith("num_batches_tracked"):
            out[key] = torch.zeros((), dtype=torch.long)
        elif key == "fc.weight":
            out[key] = torch.randn(shape, generator=g) * 0.01
        else:
            out[key] = torch.zeros(shape)
    return out


# -------------------------------------------------------------------------------------------- Stable Diffusion LoRAs


LORA_RANK = 4  # lora_layers' rank (and lora_alpha)
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]  # the UNet's attention projections


def lora_pipeline(model, *, fuse: bool = False):
    """A pipeline of the tiny SD at ``model`` with a perturbed rank-4 LoRA on the attention projections (B is zero
    at init: perturbed so that it matters), unfused peft layers or (``fuse``) fused into the weights."""
    import torch

    from sdmem.sd.components import load_components, make_pipeline
    from sdmem.sd.generate import fuse_lora
    from sdmem.sd.lora import add_lora

    comps = load_components(str(model))
    torch.manual_seed(0)
    params = add_lora(comps.unet, rank=4, alpha=2, target_modules=["to_k", "to_q", "to_v", "to_out.0"])
    with torch.no_grad():
        for p in params:
            p.add_(0.3 * torch.randn_like(p))
    if fuse:
        fuse_lora(comps.unet)
    comps.unet.eval()
    return make_pipeline(comps, comps.unet)


def lora_layers(model, seed: int) -> dict:
    """A rank-4 peft LoRA on the tiny UNet's attention projections, perturbed, with diffusers' key names: what
    diffusers' train_text_to_image_lora.py hands to save_lora_weights."""
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    from sdmem.sd.lora import add_lora

    unet = UNet2DConditionModel.from_pretrained(str(model), subfolder="unet")
    # lora_alpha = rank, as in the example script
    add_lora(unet, rank=LORA_RANK, alpha=LORA_RANK, target_modules=LORA_TARGETS)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))


# ----------------------------------------------------------------------------------------- EDM-style network pickles
# Written the way EDM's ``torch_utils.persistence`` writes them (each persistent object as a call of
# ``torch_utils.persistence._reconstruct_persistent_obj(meta)``, meta holding module_src, class_name, version 6 and
# the object's __dict__ with ``_init_args`` / ``_init_kwargs``; tensors through torch's own reducers) from sdmem
# networks, with a stand-in network source (the ``standin`` fixture registers its hash as known; the
# ``persistence`` fixture provides the fake reconstructor).

# Our own stand-in for a network module's source: SongUNet's signature (EDM's defaults), nothing that runs.
STANDIN_SRC = '''"""Stand-in network module (sdmem tests): SongUNet's constructor signature only."""


class SongUNet:
    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0,
                 model_channels=128, channel_mult=[1, 2, 2, 2], channel_mult_emb=4, num_blocks=4,
                 attn_resolutions=[16], dropout=0.10, label_dropout=0, embedding_type='positional',
                 channel_mult_noise=1, encoder_type='standard', decoder_type='standard', resample_filter=[1, 1]):
        pass
'''
STANDIN_LABEL = "test stand-in for networks.py"

DDPMPP = dict(embedding_type="positional", encoder_type="standard", decoder_type="standard", channel_mult_noise=1,
              resample_filter=[1, 1])
NCSNPP = dict(embedding_type="fourier", encoder_type="residual", decoder_type="standard", channel_mult_noise=2,
              resample_filter=[1, 3, 3, 1])
TINY = dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[], dropout=0.0)


def text_sha256(src: str) -> str:
    """SHA-256 (hex) of a source text."""
    return hashlib.sha256(src.encode()).hexdigest()


@functools.cache
def edm_names() -> dict:
    """sdmem's network classes -> the class names EDM's pickles give them."""
    from sdmem.edm.networks import (Conv2d, FourierEmbedding, GroupNorm, Linear, PositionalEmbedding, SongUNet,
                                    UNetBlock)
    from sdmem.edm.precond import EDMPrecond, VEPrecond, VPPrecond

    return {VPPrecond: "VPPrecond", VEPrecond: "VEPrecond", EDMPrecond: "EDMPrecond", SongUNet: "SongUNet",
            UNetBlock: "UNetBlock", Linear: "Linear", Conv2d: "Conv2d", GroupNorm: "GroupNorm",
            PositionalEmbedding: "PositionalEmbedding", FourierEmbedding: "FourierEmbedding"}


@functools.cache
def edm_cases() -> dict:
    """The tiny networks pickled: name -> (preconditioning, label_dim, network options as EDM's train.py passes
    them)."""
    from sdmem.edm.precond import EDMPrecond, VEPrecond, VPPrecond

    return {
        "edm-ddpmpp-uncond": (EDMPrecond, 0, dict(DDPMPP, **TINY)),
        "vp-ddpmpp-cond-augment": (VPPrecond, 3, dict(DDPMPP, **dict(TINY, attn_resolutions=[8]), augment_dim=9)),
        "ve-ncsnpp-uncond": (VEPrecond, 0, dict(NCSNPP, **TINY)),
    }


class EDMStylePickler(pickle.Pickler):
    """Pickles sdmem modules as EDM's persistent classes: (reconstructor, (meta,)) with the object's state."""

    def __init__(self, file, reconstruct, src, init_kwargs, rename=None, edit=None, protocol=4):
        super().__init__(file, protocol=protocol)
        self.reconstruct, self.src, self.init_kwargs = reconstruct, src, init_kwargs
        self.rename, self.edit = rename or {}, edit
        self.names = edm_names()

    def reducer_override(self, obj):
        from sdmem.edm.networks import SongUNet, UNetBlock

        if type(obj) not in self.names:
            return NotImplemented
        state = dict(obj.__dict__)
        if isinstance(obj, SongUNet):  # EDM's SongUNet keeps only label_dropout besides its modules
            state = {k: v for k, v in state.items() if k.startswith("_") or k in ("training", "label_dropout")}
            state["_modules"] = collections.OrderedDict(
                (k, v) for k, v in obj._modules.items() if k != "skip_gates")
        if isinstance(obj, UNetBlock):  # EDM stores np.sqrt(0.5): a numpy scalar in the pickle
            state["skip_scale"] = np.float64(state["skip_scale"])
        name = self.rename.get(type(obj), self.names[type(obj)])
        state["_init_args"], state["_init_kwargs"] = (), self.init_kwargs.get(name, {})
        if self.edit:
            self.edit(name, state)
        meta = dict(type="class", version=6, module_src=self.src, class_name=name, state=state)
        return self.reconstruct, (meta,), None


def tiny_denoiser(case: str, seed: int = 0):
    """(sdmem denoiser with random weights, EDM-style init_kwargs of its precond and of its SongUNet)."""
    import torch

    from sdmem.edm.networks import SongUNet

    precond, label_dim, options = edm_cases()[case]
    torch.manual_seed(seed)
    net = precond(8, 3, label_dim, model=SongUNet(8, 3, 3, label_dim, **options))
    with torch.no_grad():  # weights far from init, so that every tensor shows in D(x; σ)
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    kwargs = {
        edm_names()[precond]: dict(img_resolution=8, img_channels=3, label_dim=label_dim, use_fp16=False,
                                   model_type="SongUNet", **options),
        "SongUNet": dict(img_resolution=8, in_channels=3, out_channels=3, label_dim=label_dim, **options),
    }
    return net.eval(), kwargs


def write_pickle(path, net, reconstruct, kwargs, src=STANDIN_SRC, extra=None, **pickler_kw):
    """An EDM training-snapshot pickle at ``path`` (ema=net, and the other entries EDM writes, updated by
    ``extra``), its network source ``src``; the path."""
    data = dict(ema=net, loss_fn=None, augment_pipe=None, dataset_kwargs=dict(path="cifar10.zip", xflip=False))
    data.update(extra or {})
    with open(path, "wb") as f:
        EDMStylePickler(f, reconstruct, src, kwargs, **pickler_kw).dump(data)
    return path


# ------------------------------------------------------------------------------------------------- the sharded audit


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a launcher's master port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@functools.cache
def _thread_comm():
    """The ThreadComm class (made on first use: sdmem.audit imports torch)."""
    from sdmem.audit.shard import Comm

    class ThreadComm(Comm):
        """The collectives over threads of one process: each thread is one rank."""

        def __init__(self, rank, world, shared):
            self.rank, self.world, self.shared = rank, world, shared

        def _exchange(self, value):
            slots, barrier = self.shared["slots"], self.shared["barrier"]
            slots[self.rank] = value
            barrier.wait()
            out = list(slots)
            barrier.wait()
            return out

        def all_gather(self, arr):
            return [np.array(a, copy=True) for a in self._exchange(np.asarray(arr))]

        def check(self, err):
            msgs = self._exchange(None if err is None else str(err))
            if err is not None:
                raise err
            for r, m in enumerate(msgs):
                if m is not None:
                    raise SdmemError(f"process {r} of {self.world} failed: {m}")

        def barrier(self):
            self._exchange(None)

        def all_gather_object(self, obj):
            return self._exchange(obj)

    return ThreadComm


def run_sharded(world, fn):
    """fn(comm) on `world` threads; returns the per-rank results (or raised exceptions)."""
    thread_comm = _thread_comm()
    shared = {"slots": [None] * world, "barrier": threading.Barrier(world, timeout=60)}
    out = [None] * world

    def work(r):
        try:
            out[r] = fn(thread_comm(r, world, shared))
        except BaseException as exc:  # noqa: BLE001
            out[r] = exc
    threads = [threading.Thread(target=work, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def tricky_set(n=60, side=3, seed=0):
    """Training images with duplicates across and inside shards and equidistant ties, and queries on them."""
    rng = np.random.default_rng(seed)
    d = side * side * 3
    train = rng.integers(0, 256, (n, d), dtype=np.uint8)
    train[n // 2] = train[n // 2 - 1]  # straddles the 2-shard boundary
    train[n - 5] = train[3]
    train[n - 2] = train[n - 9] = train[8]  # three copies in three shards
    train[n - 12] = train[n - 11]  # inside the last shard
    q = rng.integers(20, 230, (4, d), dtype=np.uint8)
    for i, p in ((5, 0), (n - 7, 1)):  # query 0: two at distance 1, far apart
        train[i] = q[0]
        train[i, p] += 1
    train[n - 3] = q[1]  # query 1: nearest in the last shard, two ties for second
    for i, p in ((12, 0), (n - 15, 1)):
        train[i] = q[1]
        train[i, p] -= 2
    queries = np.concatenate([train[[n - 5, n // 2, n - 2, 8, n - 12]], q,
                              rng.integers(0, 256, (6, d), dtype=np.uint8)])
    return queries.reshape(-1, side, side, 3), train.reshape(n, side, side, 3)


# ----------------------------------------------------------------------------------------------- CIFAR-10 archives


class Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 str opcodes (BINSTRING), like the official CIFAR-10 pickles."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_bytes(self, obj):
        n = len(obj)
        self.write((pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n))
                   + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes


def py2_pickle(obj) -> bytes:
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")  # as numpy 1 wrote it


def write_cifar_folder(root: Path, rng, class_names: list, *, n_train: int = 3, n_test: int = 2,
                       archive: str | None = "cifar-10-python.tar.gz") -> dict:
    """A miniature ``root/cifar-10-batches-py`` (data_batch_1..5 with ``n_train`` images each, test_batch with
    ``n_test``, batches.meta: Python 2 pickles, as the official archive has them) and, unless ``archive`` is None,
    its tar.gz ``root/ARCHIVE``. {batch name: (uint8 HWC images, labels)}."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    images = {}
    for k, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        n = n_test if name == "test_batch" else n_train
        hwc = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        labels = [(k + j) % 10 for j in range(n)]
        data = hwc.transpose(0, 3, 1, 2).reshape(n, 3072)  # CHW rows, as in the official files
        (folder / name).write_bytes(py2_pickle({b"batch_label": name.encode(), b"labels": labels, b"data": data,
                                                b"filenames": [b"x.png"] * n}))
        images[name] = (hwc, labels)
    (folder / "batches.meta").write_bytes(py2_pickle({b"label_names": [c.encode() for c in class_names],
                                                      b"num_cases_per_batch": n_train}))
    if archive is not None:
        with tarfile.open(root / archive, "w:gz") as tf:
            tf.add(folder, arcname="cifar-10-batches-py")
    return images
