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


def parties(protocol, cut, n_images=24, batch=8, seed=0, secret=bytes(range(32))):
    torch.manual_seed(seed)
    images = torch.rand(n_images, *SHAPE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    scheduler = make_scheduler(T)
    client = Client("A", images, make_unet("tiny", 16), scheduler, cut, protocol, batch, 1e-3, seed,
                    secret=secret)
    server = Server(make_unet("tiny", 16), scheduler, cut, protocol, SHAPE, 1e-3, seed)
    return client, server


def image_arrays(msg):
    return [v for v in msg.tensors.values() if v.dim() == 4]


def _sent_images(client, server, rounds=3):
    """Every server-bound message of 3 rounds of 2 batches (2 epochs of 24 images), decoded
    from its wire form and checked by the server."""
    out = []
    for _ in range(rounds):
        for msg in client.train_round(2):
            msg = decode(encode(msg))
            server.check(msg)
            out.append(msg)
    return out


@pytest.mark.parametrize("cut", [1, 10, 15])
def test_noisy_data_sends_each_image_only_at_the_handover_noise_level(cut):
    """Every view is y = a x0 + b xi with xi from the client's secret: the nearest clean image
    is as far from y / a as the hand-over noise puts it, (b / a)^2 per pixel."""
    client, server = parties("noisy-data", cut)
    abar = float(client.scheduler.alphas_cumprod[cut - 1])
    noise_var = (1 - abar) / abar
    clean = client.images.flatten(1)
    views = torch.cat([m.views for m in _sent_images(client, server)])
    assert len(views) > 0
    estimate = views.flatten(1) / abar ** 0.5
    nearest = torch.cdist(estimate, clean).min(dim=1).values ** 2 / clean.shape[1]
    # per-pixel error of a view estimate: (b/a)^2 chi^2_256 / 256, which is > 0.6 (b/a)^2
    # with overwhelming probability; a clean or less noisy image would be far below that
    assert bool((nearest > 0.6 * noise_var).all()), (float(nearest.min()), noise_var)


def test_shared_noise_gives_the_server_every_image_exactly():
    """The paper's protocol: (x_t, t, eps) determine x0 (docs/design.md section 3). Kept as it is."""
    client, server = parties("shared-noise", 10)
    clean = client.images.flatten(1)
    for msg in _sent_images(client, server):
        abar = client.scheduler.alphas_cumprod[msg.t].view(-1, 1, 1, 1)
        x0 = (msg.x_t - (1 - abar).sqrt() * msg.eps) / abar.sqrt()
        nearest = torch.cdist(x0.flatten(1), clean).min(dim=1).values
        assert bool((nearest < 1e-4).all())


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
    # a client restarted with the same secret makes the same views, whatever the run seed
    again, _ = parties("noisy-data", cut=10, n_images=16, batch=8, seed=5)
    assert torch.equal(again.views, fixed_views)


def test_views_come_from_the_secret_and_all_of_it():
    """Nothing the server knows (run seed, config) fixes the view noise; every secret byte does."""
    from collafuse.client import view_noise

    base = bytes(range(32))
    views = parties("noisy-data", cut=10, secret=base)[0].views
    for i in (0, 3, 31):  # torch would keep only 32 bits of a seed; the secret must count whole
        other = bytearray(base)
        other[i] ^= 1
        assert not torch.equal(parties("noisy-data", cut=10, secret=bytes(other))[0].views, views)
    assert torch.equal(view_noise(base, (2, 3)), view_noise(base, (2, 3)))
    with pytest.raises(ValueError, match="secret"):
        parties("noisy-data", cut=10, secret=b"short")


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


def test_split_inference_at_the_extremes_is_one_partys_chain_on_its_own_stream():
    """c = 0: the server's chain from its own stream is the whole chain; c = 1: the server only
    draws x_T from its stream and the client's chain runs on the client's own stream."""
    from collafuse.diffusion import denoise, server_timesteps
    from collafuse.models import predict_noise

    for cut in (0, T):
        client, server = parties("shared-noise", cut=cut)
        partial = server.generate(SampleRequest("A", 3, seed=7))
        out = client.finish_samples(partial, seed=7)
        g = server.stream("sample", 7)
        x = torch.randn((3, *SHAPE), generator=g)
        model = server.model if cut == 0 else client.model
        g = g if cut == 0 else client.stream("sample", 7)
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
