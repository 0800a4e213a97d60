"""Published EDM network pickles (sdmem.edm.pickles, read by sdmem.safe_pickle): restricted unpickling, source
recognition by SHA-256, rebuilding.

No real pickle can be downloaded here, and NVlabs' network source may not be copied into the tests, so the
pickles are written the way EDM's ``torch_utils.persistence`` writes them (each persistent object as a call of
``torch_utils.persistence._reconstruct_persistent_obj(meta)``, meta holding module_src, class_name, version 6
and the object's __dict__ with ``_init_args`` / ``_init_kwargs``; tensors through torch's own reducers) from
sdmem networks, with a tiny stand-in source whose hash the tests register as known (with the published
SongUNet signature as its defaults, which the stand-in's own signature is checked to equal).
"""

import json
import collections
import inspect
import io
import math
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import (STANDIN_LABEL, STANDIN_SRC, edm_cases, edm_names, raises, text_sha256, tiny_denoiser,
                     write_pickle)
from sdmem.edm import pickles
from sdmem.edm.networks import SongUNet
from sdmem.edm.pickles import load_edm_pickle, read_edm_pickle, recognise_source
from sdmem.edm.precond import EDMPrecond, VEPrecond, VPPrecond
from sdmem.errors import InputError
from sdmem.safe_pickle import PersistentRecord, read_pickle

# The stand-in network source, the tiny networks and the pickle writer: helpers.py; the standin and persistence
# fixtures: conftest.py.
CASES, EDM_NAMES = edm_cases(), edm_names()


pytestmark = pytest.mark.usefixtures("one_thread_module")


def denoise(net, label_dim):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 8, 8, generator=g)
    sigma = torch.tensor([0.05, 0.5, 2.0, 20.0])
    labels = torch.tensor([0, 1, 2, 1]) if label_dim else None
    with torch.no_grad():
        return net(x, sigma, labels)


# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip_gives_the_same_denoiser(tmp_path, standin, persistence, case):
    net, kwargs = tiny_denoiser(case)
    path = write_pickle(tmp_path / f"{case}.pkl", net, persistence, kwargs)
    loaded, info = load_edm_pickle(path)
    precond, label_dim, options = CASES[case]
    assert type(loaded) is precond and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    expected = denoise(net, label_dim)
    assert torch.equal(denoise(loaded, label_dim), expected)
    x_only = denoise(precond(8, 3, label_dim, model=SongUNet(8, 3, 3, label_dim, **options)), label_dim)
    assert not torch.allclose(expected, x_only, atol=1e-3)  # the network's weights matter to the output
    assert info["class_name"] == EDM_NAMES[precond] and info["model_type"] == "SongUNet"
    assert info["precond"] == {VPPrecond: "vp", VEPrecond: "ve", EDMPrecond: "edm"}[precond]
    assert info["arch"] == ("ncsnpp" if "ncsnpp" in case else "ddpmpp")
    assert (info["img_resolution"], info["img_channels"], info["label_dim"]) == (8, 3, label_dim)
    assert info["source_version"] == STANDIN_LABEL and info["source_match"] == "text"
    assert info["source_sha256"] == text_sha256(STANDIN_SRC)
    assert info["network_kwargs"]["num_blocks"] == 1 and info["network_kwargs"]["channel_mult_emb"] == 4
    assert info["pickle_keys"] == ["augment_pipe", "dataset_kwargs", "ema", "loss_fn"]
    assert math.isclose(info["sigma_max"], float(net.sigma_max))


def test_pickle_structure_is_edms(tmp_path, standin, persistence):
    """What the restricted reader sees: persistent records (persistence version 6) with the state EDM pickles."""
    net, kwargs = tiny_denoiser("edm-ddpmpp-uncond")
    data = read_edm_pickle(write_pickle(tmp_path / "n.pkl", net, persistence, kwargs))
    ema = data["ema"]
    assert isinstance(ema, pickles.PersistentRecord) and ema.class_name == "EDMPrecond" and ema.version == 6
    assert ema.module_src == STANDIN_SRC and ema.state["_init_kwargs"]["model_type"] == "SongUNet"
    model = ema.state["_modules"]["model"]
    assert model.class_name == "SongUNet" and isinstance(model.state["_modules"]["enc"], pickles.ModuleRecord)
    block = model.state["_modules"]["enc"].state["_modules"]["4x4_down"]
    assert block.class_name == "UNetBlock" and block.state["skip_scale"] == pytest.approx(math.sqrt(0.5))
    weight = block.state["_modules"]["conv0"].state["_parameters"]["weight"]
    assert type(weight) is torch.Tensor and torch.equal(weight, net.model.enc["4x4_down"].conv0.weight)
    assert data["dataset_kwargs"] == dict(path="cifar10.zip", xflip=False)


def test_module_names_follow_edms_songunet():
    """sdmem's tensor names are those EDM's SongUNet constructor creates (read from NVlabs/edm networks.py)."""
    net, _ = tiny_denoiser("edm-ddpmpp-uncond")
    assert list(net.model.enc) == ["8x8_conv", "8x8_block0", "4x4_down", "4x4_block0"]
    assert list(net.model.dec) == ["4x4_in0", "4x4_in1", "4x4_block0", "4x4_block1", "8x8_up", "8x8_block0",
                                   "8x8_block1", "8x8_aux_norm", "8x8_aux_conv"]
    keys = set(net.state_dict())
    for key in ("model.map_layer0.weight", "model.map_layer1.bias", "model.enc.8x8_conv.weight",
                "model.enc.4x4_down.skip.resample_filter", "model.enc.4x4_down.conv0.resample_filter",
                "model.dec.4x4_in0.qkv.weight", "model.dec.4x4_in0.norm2.bias", "model.dec.8x8_aux_conv.bias",
                "model.dec.8x8_up.skip.weight"):
        assert key in keys, key
    ncsn, _ = tiny_denoiser("ve-ncsnpp-uncond")
    assert "model.map_noise.freqs" in ncsn.state_dict() and "4x4_aux_residual" in ncsn.model.enc


def test_an_edited_source_is_refused_only_line_endings_may_differ(tmp_path, standin, persistence):
    """Recognition is by SHA-256 of the text alone: a comment, a space or a changed default makes it unknown."""
    net, kwargs = tiny_denoiser("edm-ddpmpp-uncond")
    crlf = STANDIN_SRC.replace("\n", "\r\n")  # the hash is of the text with LF line endings
    assert recognise_source(crlf) == (STANDIN_LABEL, "text", text_sha256(STANDIN_SRC))
    _, info = load_edm_pickle(write_pickle(tmp_path / "crlf.pkl", net, persistence, kwargs, src=crlf))
    assert info["source_version"] == STANDIN_LABEL and info["source_sha256"] == text_sha256(STANDIN_SRC)
    edits = {"comment": STANDIN_SRC.replace('"""\n', '"""\n# a comment NVlabs might have had\n', 1),
             "space": STANDIN_SRC.replace("pass\n", "pass \n"),
             "indent": STANDIN_SRC.replace("\n                 model_channels", "\n        model_channels"),
             "default": STANDIN_SRC.replace("num_blocks=4", "num_blocks=3")}
    for name, variant in edits.items():
        assert variant != STANDIN_SRC and recognise_source(variant) is None, name
        path = write_pickle(tmp_path / f"{name}.pkl", net, persistence, kwargs, src=variant)
        raises(lambda: load_edm_pickle(path), str(path), "not one of NVlabs' published versions", "it was not run")
    assert not hasattr(pickles, "KNOWN_SOURCE_TREES") and not hasattr(pickles, "_syntax_fingerprint")


def test_published_sources_are_registered():
    """Two distinct SHA-256s, one per published version, each with SongUNet's signature in sdmem's table."""
    hashes, versions = list(pickles.KNOWN_SOURCES), list(pickles.KNOWN_SOURCES.values())
    assert len(hashes) == 2 and len(set(hashes)) == 2 and len(set(versions)) == 2
    assert all(re.fullmatch(r"[0-9a-f]{64}", h) for h in hashes)
    assert all("NVlabs/edm" in v and "networks.py" in v for v in versions)
    assert set(pickles.SONGUNET_SIGNATURES) == set(versions)  # a table entry for each version, and no other
    oct22, nov22 = (pickles.SONGUNET_SIGNATURES[v] for v in (pickles._V_2022_10, pickles._V_2022_11))
    # The published versions differ only inside Conv2d.forward (the fused-upsampling padding fix), not in
    # SongUNet's signature, so their entries are equal.
    assert oct22 == nov22
    names = [n for n, _ in oct22]
    assert len(names) == len(set(names))
    # Every published argument is one sdmem's SongUNet takes (its own extra, skip_mask, is not EDM's).
    assert names == [n for n in inspect.signature(SongUNet.__init__).parameters if n not in ("self", "skip_mask")]
    required = [n for n, d in oct22 if d is pickles.REQUIRED]
    assert required == ["img_resolution", "in_channels", "out_channels"]
    defaults = dict(oct22)
    assert (defaults["model_channels"], defaults["channel_mult"], defaults["num_blocks"]) == (128, [1, 2, 2, 2], 4)
    assert (defaults["attn_resolutions"], defaults["dropout"], defaults["resample_filter"]) == ([16], 0.10, [1, 1])
    assert (defaults["embedding_type"], defaults["encoder_type"], defaults["channel_mult_noise"]) == (
        "positional", "standard", 1)


def test_standin_signature_is_the_published_one():
    """The stand-in (our own text) declares the same SongUNet signature as sdmem's table of the published
    versions, so the tests' stand-in defaults are the published ones. The stand-in is run here, by the test;
    the loader never runs any source."""
    namespace: dict = {}
    exec(compile(STANDIN_SRC, "<stand-in>", "exec"), namespace)  # noqa: S102 - the tests' own text
    params = list(inspect.signature(namespace["SongUNet"].__init__).parameters.values())[1:]
    declared = [(p.name, pickles.REQUIRED if p.default is inspect.Parameter.empty else p.default) for p in params]
    assert declared == list(pickles.SONGUNET_SIGNATURES[pickles._V_2022_10])
    assert [type(d) for _, d in declared] == [type(d) for _, d in pickles.SONGUNET_SIGNATURES[pickles._V_2022_10]]


def test_network_defaults_are_copies(tmp_path, standin, persistence):
    """Arguments left out take the published defaults (attention at 16x16: none in an 8x8 network), as copies
    that do not share lists with sdmem's table."""
    net, kwargs = tiny_denoiser("edm-ddpmpp-uncond")
    del kwargs["SongUNet"]["attn_resolutions"], kwargs["SongUNet"]["resample_filter"]
    path = write_pickle(tmp_path / "n.pkl", net, persistence, kwargs)
    loaded, info = load_edm_pickle(path)
    assert info["network_kwargs"]["attn_resolutions"] == [16] and info["network_kwargs"]["resample_filter"] == [1, 1]
    assert torch.equal(denoise(loaded, 0), denoise(net, 0))
    info["network_kwargs"]["attn_resolutions"].append(8)
    assert dict(pickles.SONGUNET_SIGNATURES[pickles._V_2022_10])["attn_resolutions"] == [16]
    assert load_edm_pickle(path)[1]["network_kwargs"]["attn_resolutions"] == [16]


def test_safe_pickle_api(tmp_path):
    """sdmem.safe_pickle on its own: plain data passes, foreign globals are refused naming the file and `what`,
    persistent records come back inert; sdmem.edm.pickles re-exports its record classes."""
    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps(collections.OrderedDict(a={1, 2}, b=b"\x00\xff", c=(1.5, "x")), protocol=2))
    assert read_pickle(path) == {"a": {1, 2}, "b": b"\x00\xff", "c": (1.5, "x")}
    path.write_bytes(pickle.dumps(_Call(os.system, "true")))
    raises(lambda: read_pickle(path, what="test pickle"), str(path), "not a plain test pickle",
           "refusing to load: it references")
    raises(lambda: read_pickle(tmp_path / "absent.pkl", what="test pickle"), "absent.pkl",
           "cannot open the test pickle")
    assert pickles.PersistentRecord is PersistentRecord and pickles.read_edm_pickle is not read_pickle


# --- refusals ---------------------------------------------------------------------------------------------------

def test_unknown_source_is_refused(tmp_path, persistence):
    net, kwargs = tiny_denoiser("edm-ddpmpp-uncond")
    path = write_pickle(tmp_path / "n.pkl", net, persistence, kwargs)  # stand-in not registered
    raises(lambda: load_edm_pickle(path), str(path), "not one of NVlabs' published versions", "EDMPrecond")


def test_embedded_source_is_never_run(tmp_path, persistence, monkeypatch):
    marker = tmp_path / "ran.txt"
    evil = f"open({str(marker)!r}, 'w').close()\nclass EDMPrecond: pass\n"
    net, kwargs = tiny_denoiser("edm-ddpmpp-uncond")
    path = write_pickle(tmp_path / "evil.pkl", net, persistence, kwargs, src=evil)
    raises(lambda: load_edm_pickle(path), str(path), "not one of NVlabs' published versions", "refusing")
    assert not marker.exists()
    # Even a source that were registered as known is only ever read, never run.
    monkeypatch.setitem(pickles.KNOWN_SOURCES, text_sha256(evil), "wrongly trusted")
    raises(lambda: load_edm_pickle(path), str(path), "knows no SongUNet defaults", "wrongly trusted")
    assert not marker.exists()


class _Call:
    """Pickles as a call of `func(*args)`, as a malicious pickle would."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize("func, spelled", [(os.system, f"{os.system.__module__}.system"), (eval, "builtins.eval"),
                                           (subprocess.Popen, "subprocess.Popen")])
@pytest.mark.parametrize("where", ["ema", "loss_fn"])
def test_foreign_globals_are_refused(tmp_path, standin, persistence, func, spelled, where):
    marker = tmp_path / "ran.txt"
    args = {os.system: f"touch {marker}", eval: f"open({str(marker)!r}, 'w')",
            subprocess.Popen: ["touch", str(marker)]}[func]
    net, kwargs = tiny_denoiser("edm-ddpmpp-uncond")
    if where == "ema":  # hidden inside the network's state
        path = write_pickle(tmp_path / "n.pkl", net, persistence, kwargs,
                            edit=lambda name, state: state.update(extra=_Call(func, args)) if name == "Conv2d" else 0)
    else:  # in another entry of the top-level dict
        path = write_pickle(tmp_path / "n.pkl", net, persistence, kwargs, extra=dict(loss_fn=_Call(func, args)))
    raises(lambda: load_edm_pickle(path), str(path), "refusing to load: it references", spelled)
    assert not marker.exists()


def test_adm_network_is_refused_clearly(tmp_path, standin, persistence):
    net, kwargs = tiny_denoiser("edm-ddpmpp-uncond")
    kwargs["EDMPrecond"]["model_type"] = "DhariwalUNet"
    path = write_pickle(tmp_path / "adm.pkl", net, persistence, kwargs, rename={SongUNet: "DhariwalUNet"})
    raises(lambda: load_edm_pickle(path), str(path), "DhariwalUNet", "ADM", "only SongUNet")


def test_iddpm_preconditioning_is_refused(tmp_path, standin, persistence):
    net, kwargs = tiny_denoiser("edm-ddpmpp-uncond")
    path = write_pickle(tmp_path / "n.pkl", net, persistence, kwargs, rename={EDMPrecond: "iDDPMPrecond"})
    raises(lambda: load_edm_pickle(path), str(path), "iDDPMPrecond", "VPPrecond, VEPrecond and EDMPrecond")


def test_defaults_come_from_the_published_version_and_misfits_are_refused(tmp_path, standin, persistence):
    net, kwargs = tiny_denoiser("edm-ddpmpp-uncond")
    del kwargs["SongUNet"]["num_blocks"]  # so the published default, 4, applies: 1-block tensors do not fit
    path = write_pickle(tmp_path / "n.pkl", net, persistence, kwargs)
    raises(lambda: load_edm_pickle(path), str(path), "tensors do not fit", "missing")


def test_unknown_network_argument_is_refused(tmp_path, standin, persistence):
    net, kwargs = tiny_denoiser("edm-ddpmpp-uncond")
    kwargs["SongUNet"]["use_xformers"] = True
    path = write_pickle(tmp_path / "n.pkl", net, persistence, kwargs)
    raises(lambda: load_edm_pickle(path), str(path), "'use_xformers'", "does not take")


def test_differing_scalar_settings_are_refused(tmp_path, standin, persistence):
    net, kwargs = tiny_denoiser("edm-ddpmpp-uncond")

    def edit(name, state):
        if name == "GroupNorm":
            state["eps"] = 1e-3
    path = write_pickle(tmp_path / "n.pkl", net, persistence, kwargs, edit=edit)
    raises(lambda: load_edm_pickle(path), str(path), "eps is 0.001 in the pickle")


def test_truncated_and_missing_files(tmp_path, standin, persistence):
    net, kwargs = tiny_denoiser("edm-ddpmpp-uncond")
    full = write_pickle(tmp_path / "n.pkl", net, persistence, kwargs).read_bytes()
    for cut in (0, 40, len(full) // 2, len(full) - 1):
        path = tmp_path / f"cut{cut}.pkl"
        path.write_bytes(full[:cut])
        raises(lambda: load_edm_pickle(path), str(path), "corrupt or truncated")
    raises(lambda: load_edm_pickle(tmp_path / "absent.pkl"), "absent.pkl", "cannot open")


def test_not_a_network_pickle(tmp_path):
    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps({"weights": [1.0, 2.0]}))
    raises(lambda: load_edm_pickle(path), str(path), "expected a dict with an 'ema' network")


def test_numpy_scalars_of_either_numpy_spelling_and_nothing_else(tmp_path):
    legacy = pickle.dumps({"s": np.float64(0.25), "i": np.int64(-3)}, protocol=2)
    assert b"numpy._core.multiarray\nscalar" in legacy or b"numpy.core.multiarray\nscalar" in legacy
    legacy = legacy.replace(b"numpy._core.multiarray\nscalar", b"numpy.core.multiarray\nscalar")  # numpy 1.x
    path = tmp_path / "np.pkl"
    path.write_bytes(legacy)
    assert read_edm_pickle(path) == {"s": 0.25, "i": -3}
    path.write_bytes(pickle.dumps({"a": np.zeros(3)}))  # arrays are not part of EDM's network state
    raises(lambda: read_edm_pickle(path), str(path), "refusing to load: it references")


def test_storage_bytes_go_through_the_weights_only_loader(tmp_path):
    """A storage whose torch.save stream hides a foreign global is refused by torch's restricted loader."""
    buf = io.BytesIO()
    torch.save({"x": _Call(os.system, "true")}, buf)  # zip stream with a foreign global inside

    class Storage:
        def __reduce__(self):
            return torch.storage._load_from_bytes, (buf.getvalue(),)

    path = tmp_path / "s.pkl"
    path.write_bytes(pickle.dumps({"ema": Storage()}))
    with pytest.raises(InputError, match="weights-only loader; refusing to load"):
        read_edm_pickle(path)


def test_sdmem_generate_samples_a_pickle_through_the_generation_core(tmp_path, standin, persistence, cli):
    case = sorted(CASES)[0]
    net, kwargs = tiny_denoiser(case)
    path = write_pickle(tmp_path / "edm-tiny.pkl", net, persistence, kwargs)
    out = tmp_path / "gen"
    args = ("generate", "--model", path, "--num", 5, "--out", out, "--steps", 3, "--batch", 2, "--device", "cpu",
            "--quiet")
    assert cli(*args).code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["made_by"]["kind"] == "edm-pickle" and manifest["settings"]["size"] == [8, 8]
    before = (out / "000003.png").read_bytes()
    (out / "000003.png").unlink()
    assert cli(*args).code == 0 and (out / "000003.png").read_bytes() == before  # resumed byte-equal
    cli(*args[:-7], "--steps", 4, "--batch", 2, "--device", "cpu", "--quiet").one_line_error("steps")
    cli("generate", "--model", path, "--num", 2, "--out", tmp_path / "g2", "--prompt", "x").one_line_error("prompts")


def test_checkpoint_check_script_generates_and_scores_a_pickle(tmp_path, standin, persistence, monkeypatch, capsys):
    """eval/check_edm_checkpoint.py end to end on a written pickle, random Inception weights and its own
    reference statistics: it generates through the core, prints the FID beside --published, and exits 1 when
    the gap exceeds the tolerance."""
    import importlib.util

    from safetensors.torch import save_file

    from sdmem import fid
    from sdmem.data import ArraySource
    from helpers import random_state_dict

    monkeypatch.setenv("SDMEM_CACHE", str(tmp_path / "cache"))
    net, kwargs = tiny_denoiser("edm-ddpmpp-uncond")
    pkl = write_pickle(tmp_path / "edm-tiny.pkl", net, persistence, kwargs)
    save_file(random_state_dict(), str(tmp_path / "w.safetensors"))
    reference = ArraySource("ref", np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8))
    stats = fid.source_stats(reference, fid.load_extractor(tmp_path / "w.safetensors", device="cpu"))
    fid.write_stats(tmp_path / "ref.npz", stats)
    path = Path(__file__).resolve().parents[1] / "eval" / "check_edm_checkpoint.py"
    spec = importlib.util.spec_from_file_location("check_edm_checkpoint", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    argv = ["check", "--pkl", str(pkl), "--ref", str(tmp_path / "ref.npz"), "--out", str(tmp_path / "gen"),
            "--weights", str(tmp_path / "w.safetensors"), "--num", "4", "--steps", "3", "--batch", "2",
            "--device", "cpu"]
    monkeypatch.setattr(sys, "argv", argv + ["--published", "0", "--tolerance", "1e9"])
    assert script.main() == 0
    out = capsys.readouterr().out
    assert "edm-tiny.pkl: 4 images (4 new" in out and "FID " in out and "published 0.00" in out
    assert sorted(p.name for p in (tmp_path / "gen").glob("*.png")) == [f"{i:06d}.png" for i in range(4)]
    monkeypatch.setattr(sys, "argv", argv + ["--published", "-1000", "--tolerance", "0.1"])
    assert script.main() == 1  # resumed (nothing new), and far from the "published" figure
    assert "(0 new" in capsys.readouterr().out
