"""Client and server speak only in messages: what crosses, what is refused."""

import pytest
import torch

from collafuse.client import Client
from collafuse.diffusion import make_scheduler
from collafuse.messages import (MessageError, NoisedBatch, NoisyViews, SampleRequest, decode,
                                encode)
from collafuse.models import make_unet
from collafuse.server import Server

T = 20
SHAPE = (1, 16, 16)


def parties(protocol, cut, n_images=24, batch=8, seed=0):
    torch.manual_seed(seed)
    images = torch.rand(n_images, *SHAPE, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    scheduler = make_scheduler(T)
    client = Client("A", images, make_unet("tiny", 16), scheduler, cut, protocol, batch, 1e-3, seed)
    server = Server(make_unet("tiny", 16), scheduler, cut, protocol, SHAPE, 1e-3, seed)
    return client, server


def image_arrays(msg):
    return [v for v in msg.tensors.values() if v.dim() == 4]


@pytest.mark.parametrize("protocol", ["shared-noise", "noisy-data"])
@pytest.mark.parametrize("cut", [1, 10, 15])
def test_no_clean_image_reaches_the_server(protocol, cut):
    client, server = parties(protocol, cut)
    clean = client.images.flatten(1)
    seen = 0
    for _ in range(3):  # 3 rounds x 2 batches of 8 = 2 epochs of 24 images
        for msg in client.train_round(2):
            msg = decode(encode(msg))  # exactly what would travel
            server.check(msg)
            seen += msg.batch_size
            for x in image_arrays(msg):
                dist = torch.cdist(x.flatten(1), clean).min() if len(x) else torch.tensor(1.0)
                assert dist > 1e-3, f"{msg.kind} carries a clean image"
    assert seen > 0


@pytest.mark.parametrize("protocol", ["shared-noise", "noisy-data"])
def test_c_zero_sends_everything_and_c_one_nothing(protocol):
    client, _ = parties(protocol, cut=0)
    assert sum(m.batch_size for m in client.train_round(3)) == 3 * 8
    client, _ = parties(protocol, cut=T)
    assert sum(m.batch_size for m in client.train_round(3)) == 0


def test_noisy_data_sends_each_image_with_the_same_noise_every_epoch():
    client, _ = parties("noisy-data", cut=10, n_images=16, batch=8)
    fixed_views = client.views.clone()
    sent = []
    for _ in range(6):  # 6 batches of 8 = 3 epochs over 16 images
        sent += [v for m in client.train_round(1) for v in m.views]
    assert torch.equal(client.views, fixed_views)
    matches = [int((fixed_views == v).flatten(1).all(1).sum()) for v in sent]
    assert matches and all(m == 1 for m in matches)  # every view sent is one image's fixed view
    # a client restarted from the same seed draws the same per-image noise
    again, _ = parties("noisy-data", cut=10, n_images=16, batch=8)
    assert torch.equal(again.views, fixed_views)


def test_message_round_trip_and_size():
    client, _ = parties("shared-noise", cut=5)
    (msg,) = client.train_round(1)
    back = decode(encode(msg))
    assert isinstance(back, NoisedBatch)
    for name, x in msg.tensors.items():
        assert torch.equal(back.tensors[name], x)
    n = msg.batch_size
    assert msg.nbytes >= n * (2 * 4 * 16 * 16 + 8)  # x_t and eps float32, t int64


def bad_messages(x_ok, t_ok):
    eps = torch.randn_like(x_ok)
    nan = x_ok.clone()
    nan[0, 0, 0, 0] = float("nan")
    return [
        (NoisedBatch("A", x_ok[:, :, :8], t_ok, eps[:, :, :8]), "shape"),
        (NoisedBatch("A", x_ok.double(), t_ok, eps.double()), "dtype"),
        (NoisedBatch("A", nan, t_ok, eps), "NaN"),
        (NoisedBatch("A", x_ok, t_ok - 15, eps), "outside"),
        (NoisedBatch("A", x_ok, t_ok.int(), eps), "int64"),
        (NoisyViews("A", x_ok, 10), "protocol"),
    ]


@pytest.mark.parametrize("case", range(6))
def test_server_rejects_bad_messages_before_touching_the_model(case):
    _, server = parties("shared-noise", cut=10)
    x = torch.randn(4, *SHAPE)
    t = torch.full((4,), 15)
    msg, reason = bad_messages(x, t)[case]
    before = [p.clone() for p in server.model.parameters()]
    good = NoisedBatch("B", x, t, torch.randn_like(x))
    with pytest.raises(MessageError, match=reason):
        server.train_step([good, msg])
    assert all(torch.equal(a, b) for a, b in zip(before, server.model.parameters()))
    assert server.steps == 0


def test_decode_rejects_garbage():
    with pytest.raises(MessageError, match="header"):
        decode({"header": torch.zeros(3, dtype=torch.uint8).numpy()})
    arrays = encode(SampleRequest("A", 4, 0))
    arrays.pop("header")
    with pytest.raises(MessageError):
        decode(arrays)


def test_split_inference_at_the_extremes_equals_single_model_sampling():
    """c = 0: the server's chain is the whole chain; c = 1: the client's is."""
    from collafuse.diffusion import denoise, server_timesteps
    from collafuse.models import predict_noise

    for cut in (0, T):
        client, server = parties("shared-noise", cut=cut)
        model = server.model if cut == 0 else client.model
        partial = server.generate(SampleRequest("A", 3, seed=7))
        out = client.finish_samples(partial, seed=7)
        g = torch.Generator().manual_seed(7)
        x = torch.randn((3, *SHAPE), generator=g)
        g = g if cut == 0 else torch.Generator().manual_seed(7)
        ref = denoise(lambda x_t, t: predict_noise(model, x_t, t), server.scheduler, x,
                      server_timesteps(0, T), g)
        torch.testing.assert_close(out, ref)
        assert out.shape == (3, *SHAPE) and out.min() >= -1 and out.max() <= 1


def test_ema_warms_up_instead_of_clinging_to_the_initial_weights():
    from collafuse.models import EMA

    model = torch.nn.Linear(2, 2)
    ema = EMA(model, decay=0.999)
    start = [p.clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)  # first decay is min(0.999, 1/10): 90% of the new weights
    for avg, old in zip(ema.model.parameters(), start):
        torch.testing.assert_close(avg, old + 0.9)
    for _ in range(200):
        ema.update(model)
    for avg, new in zip(ema.model.parameters(), model.parameters()):
        assert (avg - new).abs().max() < 0.05  # a fixed 0.999 would still be 0.82 away
