"""Entropy-coded exemplar memories (core/pixel_codec.py, core/memory.CodedExemplarMemory) and the
ablation's codec variants."""

from __future__ import annotations

import numpy as np
import pytest

from cim_plugin.config import ConfigError, CIMConfig, variant_keys
from cim_plugin.core import pixel_codec
from cim_plugin.core.diagnostics import image_mse, psnr_db
from cim_plugin.core.memory import CodedExemplarMemory, CompressedExemplarMemory, make_memory

S = 32


def images(n=6, seed=0):
    """Smooth images (gradients plus a bright square), as photos are: JPEG codes them well."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:S, 0:S]
    out = np.empty((n, S, S, 3), dtype=np.uint8)
    for i in range(n):
        base = (x * rng.uniform(1, 4) + y * rng.uniform(1, 4))[..., None] + rng.integers(0, 60, 3)
        out[i] = np.clip(base, 0, 255)
        out[i, 8:20, 10:22] = rng.integers(150, 255, 3)
    return out


BOXES = np.array([[8, 20, 10, 22]])  # aligned to s = 2


def test_png_is_lossless_and_decodes_like_the_raw_memory():
    imgs, boxes = images(), np.repeat(BOXES, 6, axis=0)
    raw, png = CompressedExemplarMemory((S, S, 3), 4.0), CodedExemplarMemory((S, S, 3), 4.0, "png", 50)
    raw.add_class(0, imgs, boxes)
    png.add_class(0, imgs, boxes)
    np.testing.assert_array_equal(png.images(0), raw.images(0))
    np.testing.assert_array_equal(png.reconstruct(imgs, boxes), raw.reconstruct(imgs, boxes))


def test_jpeg_costs_are_the_real_payload_bytes_and_the_budget_holds():
    imgs, boxes = images(), np.repeat(BOXES, 6, axis=0)
    mem = CodedExemplarMemory((S, S, 3), 4.0, "jpeg", 50)
    costs = mem.costs_of(boxes, imgs)
    kept = mem.add_class(0, imgs, boxes, budget=float(costs[:4].sum()))
    assert kept == 4
    assert mem.bytes_used() == pytest.approx(costs[:4].sum() * mem.full_exemplar_bytes)
    assert mem.summary()["bytes_per_exemplar"]["max"] <= mem.full_exemplar_bytes
    assert (costs < CompressedExemplarMemory((S, S, 3), 4.0).costs_of(boxes)).all()  # JPEG beats raw pixels
    assert psnr_db(float(image_mse(imgs[:4], mem.images(0)).mean())) > 25


def test_mrdc_is_one_jpeg_of_the_whole_image():
    imgs = images(2)
    full = np.array([[0, S, 0, S]] * 2)
    mem = CodedExemplarMemory((S, S, 3), 4.0, "jpeg", 50)
    mem.add_class(0, imgs, full)
    whole = [pixel_codec.encode(img, "jpeg", 50) for img in imgs]
    assert mem.bytes_used() == sum(len(w) + CodedExemplarMemory.HEADER for w in whole)
    np.testing.assert_array_equal(mem.images(0)[1], pixel_codec.decode(whole[1], (S, S, 3), 50))


def test_an_empty_box_stores_only_the_low_resolution_image():
    imgs = images(1)
    mem = CodedExemplarMemory((S, S, 3), 4.0, "png", 50)
    mem.add_class(0, imgs, np.zeros((1, 4), dtype=np.int64))
    np.testing.assert_array_equal(mem.images(0), CompressedExemplarMemory((S, S, 3), 4.0).reconstruct(imgs, np.zeros((1, 4), dtype=np.int64)))


def test_coded_costs_need_the_images_and_state_refuses_another_codec():
    mem = make_memory((S, S, 3), 4.0, "jpeg", 50)
    with pytest.raises(ValueError, match="pass the images"):
        mem.costs_of(np.repeat(BOXES, 2, axis=0))
    mem.add_class(0, images(2), np.repeat(BOXES, 2, axis=0))
    again = make_memory((S, S, 3), 4.0, "jpeg", 50)
    again.load_state_dict(mem.state_dict())
    np.testing.assert_array_equal(again.images(0), mem.images(0))
    with pytest.raises(ValueError, match="quality: saved 50, this run 80"):
        make_memory((S, S, 3), 4.0, "jpeg", 80).load_state_dict(mem.state_dict())
    assert isinstance(make_memory((S, S, 3), 4.0), CompressedExemplarMemory) and not isinstance(make_memory((S, S, 3), 4.0), CodedExemplarMemory)


def test_codec_keys_and_variants():
    assert CIMConfig.from_args({"cim_codec": "webp", "cim_codec_quality": 80}).cim_codec == "webp"
    with pytest.raises(ConfigError, match="cim_codec"):
        CIMConfig.from_args({"cim_codec": "gif"})
    with pytest.raises(ConfigError, match="cim_codec_quality"):
        CIMConfig.from_args({"cim_codec_quality": 0})
    assert variant_keys("off") is None
    assert variant_keys("pau") == {"cim": True, "cim_mask": "pau", "cim_codec": "raw"}
    assert variant_keys("pau+jpeg") == {"cim": True, "cim_mask": "pau", "cim_codec": "jpeg"}
    assert variant_keys("mrdc") == {"cim": True, "cim_mask": "full", "cim_codec": "jpeg"}
    for bad in ("jpeg", "pau+gif", "pau+", "mrdc+jpeg"):
        with pytest.raises(ValueError, match="unknown variant"):
            variant_keys(bad)
    # a quality pilot in one ablation: @q after a codec
    assert variant_keys("mrdc@30") == {"cim": True, "cim_mask": "full", "cim_codec": "jpeg", "cim_codec_quality": 30}
    assert variant_keys("pau+webp@75")["cim_codec_quality"] == 75
    for bad, why in (("pau@30", "needs a pixel codec"), ("off@30", "needs a pixel codec"), ("mrdc@0", r"\[1, 100\]"),
                     ("mrdc@x", r"\[1, 100\]"), ("mrdc@", r"\[1, 100\]"), ("gif@30", "unknown variant")):
        with pytest.raises(ValueError, match=why):
            variant_keys(bad)


def test_the_ablation_gives_codec_variants_their_keys():
    from cim_plugin import ablation, ablation_report

    base = {"model_name": "icarl", "cim_codec": "jpeg", "seed": [1]}
    assert ablation.variant_config(base, "pau", 3)["cim_codec"] == "raw"  # a raw variant stays raw
    assert ablation.variant_config(base, "cam+png", 3)["cim_codec"] == "png"
    assert sorted(["pau+jpeg", "mrdc", "pau", "off", "cam"], key=ablation_report.variant_rank) == ["off", "cam", "pau", "pau+jpeg", "mrdc"]
    assert sorted(["mrdc@75", "mrdc@10", "off", "mrdc"], key=ablation_report.variant_rank) == ["off", "mrdc", "mrdc@10", "mrdc@75"]
    assert ablation.variant_config({**base, "cim_codec_quality": 50}, "mrdc@10", 3)["cim_codec_quality"] == 10


def test_jpeg_tables_are_stored_once_and_streams_decode_like_whole_files():
    from cim_plugin.core.pixel_codec import _encode_pil, jpeg_tables

    img = images(1)[0]
    whole, stream = _encode_pil(img, "jpeg", 50), pixel_codec.encode(img, "jpeg", 50)
    assert len(stream) < len(whole) - 400 and not stream.startswith(b"\xff\xd8")
    np.testing.assert_array_equal(pixel_codec.decode(stream, img.shape, 50), pixel_codec.decode(whole, img.shape))
    with pytest.raises(ValueError, match="needs the memory's quality"):
        pixel_codec.decode(stream, img.shape)
    mem = CodedExemplarMemory((S, S, 3), 4.0, "jpeg", 50)
    mem.add_class(0, images(2), np.repeat(BOXES, 2, axis=0))
    assert mem.metadata_bytes() >= len(jpeg_tables(50))  # counted once, beside the pixels


def test_codec_variants_run_and_report_through_the_ablation(tmp_path):
    from cim_plugin import ablation, ablation_report

    from fakes import BASE, FakeRunner

    specs = ablation.plan([BASE], ["off", "mrdc", "pau+jpeg", "pau"], [1], tmp_path)
    out = ablation.execute(specs, tmp_path, tmp_path, runner=FakeRunner())
    assert sorted(out["ran"]) == sorted(s.name for s in specs)
    written = ablation_report.report(tmp_path, figures=True)
    table = written["aggregate.md"].read_text()
    assert [v for v in ("| off |", "| pau |", "| pau+jpeg |", "| mrdc |") if v not in table] == []
    assert table.index("| pau |") < table.index("| pau+jpeg |") < table.index("| mrdc |")


def test_a_coded_state_round_trips_and_a_misaligned_box_is_refused_on_loading():
    mem = make_memory((S, S, 3), 4.0, "jpeg", 50)
    mem.add_class(0, images(4), np.repeat(BOXES, 4, axis=0))
    state = mem.state_dict()
    back = make_memory((S, S, 3), 4.0, "jpeg", 50)
    back.load_state_dict(state)
    np.testing.assert_array_equal(back.images(0), mem.images(0))
    state["classes"][0]["boxes"][1] = [7, 20, 10, 22]  # off the s = 2 grid
    with pytest.raises(ValueError, match="class 0 is inconsistent.*aligned"):
        make_memory((S, S, 3), 4.0, "jpeg", 50).load_state_dict(state)
