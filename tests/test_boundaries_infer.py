"""U-Net shapes, tiled inference, post-processing, grain statistics and metrics."""

import json
import math

import numpy as np
import pytest
import torch
from skimage import measure

from grainlab.boundaries.baseline import trace_classical
from grainlab.boundaries.grains import (
    Postprocess,
    astm_grain_size,
    grain_stats,
    heyn_intercept,
    label_grains,
    prune_spurs,
    trace_boundaries,
)
from grainlab.boundaries.infer import (
    LoadedModel,
    blend_window,
    cpu_has_bf16,
    inference_network,
    load_model,
    predict_logits,
    predict_probability,
    tile_layout,
    trains_channels_last,
    uses_bf16,
)
from grainlab.boundaries.metrics import (
    boundary_scores,
    centroid_scores,
    centroids,
    grain_scores,
    partition_scores,
    score_tracing,
)
from grainlab.boundaries.train import save_checkpoint
from grainlab.boundaries.unet import UNetArgs, build_unet
from grainlab.errors import GrainlabError
from test_boundaries_fixtures import boundary_network, grain_map, micrograph, voronoi_grains


@pytest.mark.parametrize("norm", ["batch", "group", "none"])
@pytest.mark.parametrize("in_channels", [1, 3])
def test_unet_outputs_one_logit_map(norm, in_channels):
    net = build_unet(UNetArgs(depth=3, base_channels=4, dropout=0.5, norm=norm, in_channels=in_channels))
    out = net(torch.rand(2, in_channels, 32, 48))
    assert out.shape == (2, 1, 32, 48)
    assert net(torch.rand(1, in_channels, 16, 16).to(memory_format=torch.channels_last)).shape == (
        1,
        1,
        16,
        16,
    )


def test_paper_unet_is_64_to_1024_with_dropout_at_the_two_deepest_levels():
    net = build_unet(UNetArgs(depth=5, base_channels=64, dropout=0.5))
    widths = [block[0].out_channels for block in net.down]
    assert widths == [64, 128, 256, 512, 1024]
    dropouts = [any(isinstance(m, torch.nn.Dropout2d) for m in block) for block in net.down]
    assert dropouts == [False, False, False, True, True]
    with pytest.raises(GrainlabError, match="multiples of 16"):
        net(torch.rand(1, 1, 40, 40))


@pytest.fixture
def model(tmp_path):
    torch.manual_seed(0)
    args = UNetArgs(depth=3, base_channels=4)
    net = build_unet(args)
    path = tmp_path / "m.pt"
    save_checkpoint(path, {"model_args": args.to_dict(), "model": net.state_dict(), "epoch": 2, "params": {}})
    return load_model(path, torch.device("cpu"))


@pytest.mark.parametrize("shape", [(1, 1), (5, 3), (37, 130), (300, 200), (64, 3)])
def test_tiled_inference_handles_any_size(model, shape):
    prob = predict_probability(model, np.random.default_rng(0).random(shape, dtype=np.float32), tile=32)
    assert prob.shape == shape and prob.dtype == np.float32
    assert np.isfinite(prob).all() and prob.min() >= 0 and prob.max() <= 1


def test_tiles_blend_to_the_whole_image_result(model):
    image = np.random.default_rng(1).random((64, 64), dtype=np.float32)
    whole = predict_probability(model, image, tile=64)
    tiled = predict_probability(model, image, tile=32, overlap=0.5, batch_size=3)
    assert np.abs(whole - tiled).mean() < 0.05
    w = blend_window(40, 8)
    assert w.shape == (40,) and w.min() > 0 and w[8:32].min() == 1
    # in an overlap of exactly the ramp, one tile fades out as the next fades in
    np.testing.assert_allclose(w[-8:] + w[:8], 1, atol=1e-3)


@pytest.mark.parametrize("length", [1, 7, 32, 100, 250, 257, 2048, 8192])
@pytest.mark.parametrize("tile", [32, 256, 1024])
def test_tile_layout_covers_with_the_fewest_evenly_spread_tiles(length, tile):
    side, starts = tile_layout(length, tile, tile // 8, 8)
    assert side % 8 == 0 and side <= max(tile, -(-length // 8) * 8)
    assert starts[0] == 0 and starts[-1] + side >= length
    overlaps = [a + side - b for a, b in zip(starts, starts[1:], strict=False)]
    assert all(o >= tile // 8 for o in overlaps)
    assert len(starts) == max(1, -(-(length - tile // 8) // (tile - tile // 8)))


def test_folded_batchnorm_gives_the_same_logits(model):
    net = model.net
    for m in net.modules():  # non-trivial running statistics and affine parameters
        if isinstance(m, torch.nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    fast = inference_network(net)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    x = torch.rand(2, 1, 48, 64)
    with torch.inference_mode():
        np.testing.assert_allclose(fast(x).numpy(), net(x).numpy(), rtol=1e-4, atol=1e-4)
    # cached until a weight changes
    assert inference_network(net) is fast
    with torch.no_grad():
        net.head.bias += 1
    assert inference_network(net) is not fast


def reference_logits(model, image, tile):
    """The plain path: mirror out to whole tiles, one tile at a time, the network as it is."""
    h, w = image.shape
    ph, pw = -(-h // tile) * tile, -(-w // tile) * tile
    padded = np.pad(image, ((0, ph - h), (0, pw - w)), mode="symmetric")
    out = np.zeros((ph, pw), np.float32)
    with torch.no_grad():
        for y in range(0, ph, tile):
            for x in range(0, pw, tile):
                t = torch.from_numpy(np.ascontiguousarray(padded[None, None, y : y + tile, x : x + tile]))
                out[y : y + tile, x : x + tile] = model.net(t)[0, 0].numpy()
    return out[:h, :w]


def test_fast_tiled_inference_matches_the_plain_path_on_one_tile(model, monkeypatch):
    # one tile: the blended, folded, channels-last path must give the plain network's output
    monkeypatch.setenv("GRAINLAB_PRECISION", "fp32")
    image = np.random.default_rng(3).random((64, 64), dtype=np.float32)
    np.testing.assert_allclose(
        predict_logits(model, image, tile=64), reference_logits(model, image, 64), rtol=1e-4, atol=1e-4
    )
    prob = predict_probability(model, image, tile=64)
    np.testing.assert_allclose(prob, 1 / (1 + np.exp(-reference_logits(model, image, 64))), atol=1e-5)


def test_bf16_inference_stays_close_to_fp32_and_the_choice_is_checked(model, monkeypatch):
    image = np.random.default_rng(5).random((96, 80), dtype=np.float32)
    monkeypatch.setenv("GRAINLAB_PRECISION", "fp32")
    fp32 = predict_logits(model, image, tile=64)
    monkeypatch.setenv("GRAINLAB_PRECISION", "bf16")
    bf16 = predict_logits(model, image, tile=64)
    assert bf16.dtype == np.float32 and not np.array_equal(bf16, fp32)  # bf16 really ran
    np.testing.assert_allclose(bf16, fp32, atol=0.05)
    assert uses_bf16(torch.device("cpu"))
    monkeypatch.setenv("GRAINLAB_PRECISION", "fp16")
    with pytest.raises(GrainlabError, match="GRAINLAB_PRECISION = 'fp16': expected one of auto, fp32, bf16"):
        predict_logits(model, image, tile=64)
    monkeypatch.setenv("GRAINLAB_PRECISION", "auto")
    assert uses_bf16(torch.device("cpu")) == cpu_has_bf16()


def test_blending_is_a_weighted_mean_of_overlapping_tiles(model):
    # a constant network output must come back unchanged wherever tiles overlap
    image = np.random.default_rng(4).random((200, 136), dtype=np.float32)
    with torch.no_grad():
        for p in model.net.head.parameters():
            p.zero_()
        model.net.head.bias += 1.5
    np.testing.assert_allclose(predict_logits(model, image, tile=64, overlap=0.25), 1.5, atol=1e-5)


def test_rgb_input_to_grey_model(model):
    assert predict_probability(model, np.zeros((20, 20, 3), np.float32), tile=32).shape == (20, 20)
    with pytest.raises(GrainlabError, match="expected"):
        predict_probability(model, np.zeros((2, 20, 20, 3), np.float32))


def test_checkpoints_load_with_weights_only(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(GrainlabError, match="bad.pt: not a readable"):
        load_model(bad)
    with pytest.raises(GrainlabError, match="not found"):
        load_model(tmp_path / "missing.pt")
    torch.save({"other": 1}, tmp_path / "other.pt")
    with pytest.raises(GrainlabError, match="not a grainlab boundary checkpoint"):
        load_model(tmp_path / "other.pt")


def test_prune_spurs_removes_short_free_branches_only():
    skel = np.zeros((30, 30), bool)
    skel[15, :] = True  # a line across the image (ends on the border: kept)
    skel[10:15, 10] = True  # a 5 px spur
    skel[3:15, 20] = True  # a 12 px branch
    pruned = prune_spurs(skel, 8)
    assert pruned[15].all() and not pruned[10:15, 10].any() and pruned[3:15, 20].all()


def perfect_probability(labels):
    from scipy import ndimage

    prob = ndimage.gaussian_filter(ndimage.binary_dilation(boundary_network(labels)).astype(float), 1)
    return prob / prob.max()


@pytest.mark.parametrize("method", ["watershed", "skeleton"])
def test_postprocessing_recovers_the_grains_of_a_clean_map(method):
    labels = voronoi_grains(128, 15, 3)
    post = Postprocess(method=method)
    tracing = trace_boundaries(perfect_probability(labels), post)
    grains = label_grains(tracing, post)
    assert grains.max() == 15
    scores = score_tracing(tracing, grains, boundary_network(labels), grain_map(labels))
    assert scores["boundary_f1"] > 0.95 and scores["count_error"] == 0 and scores["orphan_fraction"] == 0
    edge_free = label_grains(tracing, Postprocess(method=method, drop_edge_grains=True))
    assert 0 < edge_free.max() < 15


def test_heyn_intercept_and_astm_number_by_hand():
    tracing = np.zeros((64, 64), bool)
    tracing[:, 15] = tracing[:, 47] = True  # vertical lines 32 px apart
    # 8 horizontal test lines cross 2 boundaries each, 8 vertical ones cross none: 16 x 64 px / 16
    assert heyn_intercept(tracing, spacing=8) == pytest.approx(64.0)
    assert astm_grain_size(0.032) == pytest.approx(-6.643856 * math.log10(0.032) - 3.288)
    assert math.isinf(heyn_intercept(np.zeros((8, 8), bool)))
    labels = label_grains(tracing)
    stats = grain_stats(tracing, labels, pixel_size_nm=500.0)
    assert stats.count == 3 and stats.heyn_intercept_nm == pytest.approx(32000.0)
    assert stats.astm_g == pytest.approx(astm_grain_size(0.032))
    json.dumps(grain_stats(np.zeros((8, 8), bool), np.ones((8, 8), np.int32)).to_dict(), allow_nan=False)


def test_boundary_scores_with_tolerance():
    truth = np.zeros((20, 20), bool)
    truth[10, :] = True
    shifted = np.roll(truth, 2, axis=0)
    s = boundary_scores(shifted, truth, tolerance=2)
    assert s["boundary_f1"] == 1.0 and s["dice"] == 0.0 and s["iou"] == 0.0
    assert boundary_scores(np.roll(truth, 3, axis=0), truth, tolerance=2)["boundary_f1"] == 0.0
    assert boundary_scores(truth, truth)["dice"] == 1.0


def test_partition_and_centroid_scores():
    labels = grain_map(voronoi_grains(96, 10, 5))
    same = partition_scores(labels, labels)
    assert same["vi"] == pytest.approx(0, abs=1e-9) and same["adapted_rand"] == pytest.approx(0, abs=1e-9)
    merged = np.where(labels == 2, 1, labels)
    m = partition_scores(merged, labels)
    assert m["vi_merge"] > 0 and m["vi_split"] == pytest.approx(0, abs=1e-9)
    gapped = np.where(labels == 3, 0, labels)  # a missing label keeps the others' centroids in order
    expected = np.array([r.centroid for r in measure.regionprops(gapped)])
    assert np.allclose(centroids(gapped), expected) and centroids(np.zeros((4, 4), int)).shape == (0, 2)
    c = centroid_scores(labels, labels)
    assert c["orphan_fraction"] == 0 and c["disregistry"] == 0 and c["matched"] == 10
    g = grain_scores(boundary_network(labels), labels, boundary_network(labels), labels)
    assert g["ks"] == 0 and g["count_error"] == 0 and g["heyn_error"] == 0 and g["astm_g_diff"] == 0


def test_classical_baseline_finds_grains():
    labels = voronoi_grains(128, 15, 7)
    _, tracing = trace_classical(micrograph(labels, 1))
    s = score_tracing(tracing, label_grains(tracing), boundary_network(labels), grain_map(labels))
    assert s["boundary_f1"] > 0.5


def test_model_metadata(model):
    assert isinstance(model, LoadedModel) and model.epoch == 2 and model.in_channels == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_inference_in_bf16_channels_last_matches_cpu(tmp_path):
    args = UNetArgs(depth=3, base_channels=8)
    path = tmp_path / "m.pt"
    save_checkpoint(
        path, {"model_args": args.to_dict(), "model": build_unet(args).state_dict(), "params": {}}
    )
    image = np.random.default_rng(0).random((300, 200), dtype=np.float32)
    cpu = predict_probability(load_model(path, torch.device("cpu")), image, tile=64)
    gpu = predict_probability(load_model(path, torch.device("cuda")), image, tile=64)
    assert np.abs(cpu - gpu).max() < 0.05


def test_training_memory_format_follows_the_hardware(monkeypatch):
    from grainlab.boundaries import infer

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(infer, "cpu_has_amx", lambda: True)
    monkeypatch.setenv("GRAINLAB_PRECISION", "bf16")
    assert not trains_channels_last(cpu)  # bf16 on AMX: NCHW measured faster
    assert trains_channels_last(cuda)
    monkeypatch.setenv("GRAINLAB_PRECISION", "fp32")
    assert trains_channels_last(cpu)
    monkeypatch.setattr(infer, "cpu_has_amx", lambda: False)
    monkeypatch.setenv("GRAINLAB_PRECISION", "bf16")
    assert trains_channels_last(cpu)
