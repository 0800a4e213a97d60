"""The generation core (sdmem.generation): the seed grid, the manifest and its refusals, verified resume; through
`sdmem optimum` (byte-equal resume, never mixed with another training set) and `sdmem generate` on an EDM run."""

import json

import numpy as np
import pytest
from PIL import Image

from sdmem.data import ArraySource
from sdmem.errors import InputError
from sdmem.generation import Plan, blocks_of, generate_folder


def rand_images(n, res=8, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, res, res, 3), dtype=np.uint8)


def counting_plan(calls: list, *, batch=4, size=(2, 2), **settings):
    """A renderer whose pixels are the seed, recording every block it renders."""
    def load():
        def render(seeds, conds):
            calls.append(list(seeds))
            return np.stack([np.full((*size, 3), s % 256, np.uint8) for s in seeds])
        return render
    return Plan({"made_by": {"kind": "test"}, "batch": batch, "size": list(size), **settings},
                lambda s: {"class": s % 3}, load)


def test_blocks_sit_on_a_fixed_seed_grid():
    assert blocks_of([5, 6, 9], 4) == [[4, 5, 6, 7], [8, 9, 10, 11]]
    assert blocks_of([0], 3) == [[0, 1, 2]]


def test_a_resume_renders_whole_blocks_and_writes_only_missing_files(tmp_path):
    calls = []
    assert generate_folder(tmp_path / "g", range(10), counting_plan(calls), progress=False) == 10
    assert calls == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == [f"{s:06d}.png" for s in range(10)] + \
        ["manifest.json"]  # seeds 10, 11 were rendered for the block, not written
    (tmp_path / "g" / "000005.png").unlink()
    calls.clear()
    assert generate_folder(tmp_path / "g", range(10), counting_plan(calls), progress=False) == 1
    assert calls == [[4, 5, 6, 7]]


@pytest.mark.parametrize("damage", ["empty", "truncated", "other size", "not a png"])
def test_a_damaged_image_does_not_count_as_done(tmp_path, damage):
    calls = []
    generate_folder(tmp_path / "g", range(4), counting_plan(calls), progress=False)
    path = tmp_path / "g" / "000002.png"
    good = path.read_bytes()
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "truncated":
        path.write_bytes(good[: len(good) - 12])
    elif damage == "other size":
        Image.new("RGB", (3, 2)).save(path)
    else:
        path.write_bytes(b"GIF89a not really")
    assert generate_folder(tmp_path / "g", range(4), counting_plan(calls), progress=False) == 1
    assert path.read_bytes() == good


def test_the_manifest_records_settings_and_every_seed(tmp_path):
    generate_folder(tmp_path / "g", [2, 3], counting_plan([], steps=7), progress=False)
    m = json.loads((tmp_path / "g" / "manifest.json").read_text())
    assert m["format"] == "sdmem-generated/1" and m["settings"]["steps"] == 7 and m["settings"]["batch"] == 4
    assert m["images"] == {"000002.png": {"seed": 2, "class": 2}, "000003.png": {"seed": 3, "class": 0}}
    # Equal settings extend the folder; the manifest then lists both calls' seeds.
    generate_folder(tmp_path / "g", [9], counting_plan([], steps=7), progress=False)
    assert sorted(json.loads((tmp_path / "g" / "manifest.json").read_text())["images"]) == \
        ["000002.png", "000003.png", "000009.png"]


@pytest.mark.parametrize("change,name", [(dict(steps=8), "steps"), (dict(batch=5), "batch"),
                                         (dict(extra=1), "extra")])
def test_other_settings_are_refused_by_name_and_nothing_is_written(tmp_path, change, name):
    generate_folder(tmp_path / "g", range(3), counting_plan([], steps=7), progress=False)
    before = {p.name: p.read_bytes() for p in (tmp_path / "g").iterdir()}
    calls = []
    with pytest.raises(InputError, match=name):
        generate_folder(tmp_path / "g", range(5), counting_plan(calls, **{"steps": 7, **change}), progress=False)
    assert calls == [] and {p.name: p.read_bytes() for p in (tmp_path / "g").iterdir()} == before


def test_folders_without_a_manifest_and_files_are_refused(tmp_path):
    (tmp_path / "old").mkdir()
    Image.new("RGB", (2, 2)).save(tmp_path / "old" / "000000.png")
    with pytest.raises(InputError, match="manifest.json"):
        generate_folder(tmp_path / "old", range(2), counting_plan([]), progress=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="not a folder"):
        generate_folder(tmp_path / "file", range(2), counting_plan([]), progress=False)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text("{not json")
    with pytest.raises(InputError, match="unreadable manifest"):
        generate_folder(tmp_path / "bad", range(2), counting_plan([]), progress=False)


def test_resumed_optimum_is_byte_equal_to_an_uninterrupted_one(tmp_path):
    from sdmem.edm.optimum import sample_optimum

    src = ArraySource("train", rand_images(40, seed=3))
    full = sample_optimum(src, 10, tmp_path / "a", batch_size=3, progress=False)
    part = sample_optimum(src, 10, tmp_path / "b", batch_size=3, progress=False)
    for k in (0, 4, 9):
        part[k].unlink()
    part[6].write_bytes(part[6].read_bytes()[:20])
    sample_optimum(src, 10, tmp_path / "b", batch_size=3, progress=False)
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(full, part))


def test_optimum_refuses_a_folder_made_from_another_training_set(tmp_path, cli):
    for name, seed in (("a.npz", 1), ("b.npz", 2)):
        np.savez(tmp_path / name, images=rand_images(20, seed=seed))
    assert cli("optimum", "--train", tmp_path / "a.npz", "--num", 4, "--out", tmp_path / "o", "--quiet").code == 0
    before = sorted(p.name for p in (tmp_path / "o").iterdir())
    r = cli("optimum", "--train", tmp_path / "b.npz", "--num", 8, "--out", tmp_path / "o", "--quiet")
    r.one_line_error(str(tmp_path / "o"), "made_by")
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == before
    # The same training set extends the folder.
    assert cli("optimum", "--train", tmp_path / "a.npz", "--num", 8, "--out", tmp_path / "o", "--quiet").code == 0
    assert len(list((tmp_path / "o").glob("*.png"))) == 8


def test_a_new_class_choice_never_rewrites_the_classes_of_existing_images(tiny_edm_run, tmp_path, cli, one_thread):
    out = tmp_path / "g"
    assert cli("generate", tiny_edm_run, "--num", 4, "--out", out, "--steps", 3, "--batch", 2, "--quiet").code == 0
    before = (out / "manifest.json").read_bytes()
    classes = {v["class"] for v in json.loads(before)["images"].values()}
    other = 1 - min(classes) if len(classes) == 1 else 0
    r = cli("generate", tiny_edm_run, "--num", 4, "--out", out, "--steps", 3, "--batch", 2, "--class", other,
            "--quiet")
    r.one_line_error("class")
    assert (out / "manifest.json").read_bytes() == before


EDM_GEN = dict(seeds=list(range(7)), steps=4, device="cpu", progress=False)


@pytest.fixture
def edm_generated(tiny_edm_run, tmp_path, one_thread):
    from sdmem.edm.generate import generate_run

    assert generate_run(tiny_edm_run, tmp_path / "g1", batch=3, **EDM_GEN) == 7
    return tmp_path / "g1"


def _png(path):
    return np.asarray(Image.open(path)).astype(int)


def test_edm_generation_on_another_batch_grid_agrees_within_one_level(tiny_edm_run, edm_generated, tmp_path):
    from sdmem.edm.generate import generate_run

    assert generate_run(tiny_edm_run, tmp_path / "g2", batch=8, **EDM_GEN) == 7
    for k in range(7):  # the same per-seed noise; batched kernels may round differently on another grid
        assert np.abs(_png(edm_generated / f"{k:06d}.png") - _png(tmp_path / "g2" / f"{k:06d}.png")).max() <= 1


def test_edm_manifest_records_snapshot_batch_and_classes(edm_generated):
    manifest = json.loads((edm_generated / "manifest.json").read_text())
    assert {v["class"] for v in manifest["images"].values()} <= {0, 1}
    assert manifest["settings"]["snapshot"] == "epoch 8" and manifest["settings"]["batch"] == 3
    assert manifest["settings"]["sigma_min"] == 0.002  # the run's track.sigma_min
    assert manifest["settings"]["made_by"]["kind"] == "edm" and len(manifest["settings"]["made_by"]["fingerprint"]) == 64


def test_edm_resumed_generation_is_byte_equal(tiny_edm_run, edm_generated):
    from sdmem.edm.generate import generate_run

    before = {k: (edm_generated / f"{k:06d}.png").read_bytes() for k in range(7)}
    (edm_generated / "000003.png").unlink()
    (edm_generated / "000004.png").write_bytes(before[4][: len(before[4]) // 2])  # truncated: not done
    assert generate_run(tiny_edm_run, edm_generated, batch=3, **EDM_GEN) == 2
    assert all((edm_generated / f"{k:06d}.png").read_bytes() == before[k] for k in range(7))


@pytest.mark.parametrize("change,name", [(dict(snapshot="4"), "snapshot"), (dict(steps=5), "steps"),
                                         (dict(class_label=1), "class"), (dict(batch=4), "batch")])
def test_edm_generation_with_other_settings_is_refused(tiny_edm_run, edm_generated, change, name):
    from sdmem.edm.generate import generate_run

    with pytest.raises(InputError, match=name):
        generate_run(tiny_edm_run, edm_generated, **{**EDM_GEN, "batch": 3, **change})


def test_edm_class_out_of_range_is_refused(tiny_edm_run, tmp_path):
    from sdmem.edm.generate import generate_run

    with pytest.raises(InputError, match="--class"):
        generate_run(tiny_edm_run, tmp_path / "g3", **dict(EDM_GEN, seeds=[0]), class_label=5)
    assert not (tmp_path / "g3").exists()


def test_pngs_are_written_by_a_thread_and_its_errors_reach_the_caller(tmp_path):
    from sdmem.generation import PngWriter

    # A failed write (a folder where the file should go) is raised by the call, naming the cause.
    (tmp_path / "g").mkdir()
    generate_folder(tmp_path / "g", range(2), counting_plan([]), progress=False)
    (tmp_path / "g" / "000005.png").mkdir()
    with pytest.raises(OSError):
        generate_folder(tmp_path / "g", range(8), counting_plan([]), progress=False)
    with pytest.raises(OSError):  # a put after the failure raises too, and never blocks on the dead writer
        with PngWriter(depth=1) as writer:
            for _ in range(5):
                writer.put([(tmp_path / "g" / "000005.png", np.zeros((2, 2, 3), np.uint8))])


def test_a_render_error_still_writes_the_blocks_rendered_before_it(tmp_path):
    calls = []
    plan = counting_plan(calls)
    load = plan.load

    def failing_load():
        render = load()

        def render_or_fail(seeds, conds):
            if seeds[0] >= 8:
                raise KeyboardInterrupt  # e.g. Ctrl-C while the third block renders
            return render(seeds, conds)
        return render_or_fail
    plan.load = failing_load
    with pytest.raises(KeyboardInterrupt):
        generate_folder(tmp_path / "g", range(12), plan, progress=False)
    assert sorted(p.name for p in (tmp_path / "g").glob("*.png")) == [f"{s:06d}.png" for s in range(8)]
    assert not list((tmp_path / "g").glob(".*"))  # no temporary file left
    calls.clear()
    assert generate_folder(tmp_path / "g", range(12), counting_plan(calls), progress=False) == 4
    assert calls == [[8, 9, 10, 11]]
