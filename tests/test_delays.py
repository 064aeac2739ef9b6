import torch

from openmoshi.lm.delays import delay_codes, undelay


def test_delay_then_undelay_round_trip():
    codes = torch.arange(2 * 3 * 6).view(2, 3, 6)
    delays = [0, 1, 3]
    initial = torch.tensor([-5, -6, -7])
    delayed = delay_codes(codes, delays, initial)
    assert delayed[0, 0].tolist() == codes[0, 0].tolist()
    assert delayed[0, 1].tolist() == [-6] + codes[0, 1, :5].tolist()
    assert delayed[0, 2].tolist() == [-7, -7, -7] + codes[0, 2, :3].tolist()
    back, mask = undelay(delayed[..., None].float(), delays)
    assert mask[0].sum(-1).tolist() == [6, 5, 3]
    torch.testing.assert_close(back[..., 0][mask], codes.float()[mask])
    assert torch.isnan(back[..., 0][~mask]).all()


def test_delay_longer_than_sequence():
    codes = torch.zeros(1, 2, 2, dtype=torch.long)
    out = delay_codes(codes, [0, 5], torch.tensor([9, 9]))
    assert out[0, 1].tolist() == [9, 9]
    _, mask = undelay(out[..., None].float(), [0, 5])
    assert mask[0, 1].tolist() == [False, False]
