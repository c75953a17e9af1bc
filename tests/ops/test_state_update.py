"""Generation's one-step update, run over a sequence, is the scan: same outputs, same last state."""
import pytest
import torch

from megamoe.ops import selective_scan, selective_scan_ref, selective_state_update, selective_state_update_ref


@pytest.mark.parametrize("extras,softplus", [(True, True), (False, False)])
def test_steps_equal_the_scan(extras, softplus):
    g = torch.Generator().manual_seed(0)
    batch, d_inner, d_state, length = 2, 6, 4, 13
    u = torch.randn(batch, d_inner, length, generator=g)
    delta = torch.randn(batch, d_inner, length, generator=g) * 0.5
    if not softplus:
        delta = torch.nn.functional.softplus(delta)
    A = -torch.exp(torch.randn(d_inner, d_state, generator=g))
    B = torch.randn(batch, d_state, length, generator=g)
    C = torch.randn(batch, d_state, length, generator=g)
    D = torch.randn(d_inner, generator=g) if extras else None
    z = torch.randn(batch, d_inner, length, generator=g) if extras else None
    dt_bias = torch.randn(d_inner, generator=g) if extras else None

    y_ref, last_ref = selective_scan_ref(u, delta, A, B, C, D, z, dt_bias, softplus, return_last_state=True)
    for update in (selective_state_update_ref, selective_state_update):
        state = torch.zeros(batch, d_inner, d_state)
        ys = [update(state, u[..., t], delta[..., t], A, B[..., t], C[..., t], D,
                     z[..., t] if z is not None else None, dt_bias, softplus) for t in range(length)]
        torch.testing.assert_close(torch.stack(ys, dim=2), y_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(state, last_ref, rtol=1e-5, atol=1e-5)

    # the fast scan agrees too, and its last state continues the recurrence: prefix scan + steps = full scan
    y_fast, last_fast = selective_scan(u, delta, A, B, C, D, z, dt_bias, softplus, return_last_state=True)
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-5, atol=1e-5)
    split = 7
    _, state = selective_scan(u[..., :split], delta[..., :split], A, B[..., :split], C[..., :split], D,
                              z[..., :split] if z is not None else None, dt_bias, softplus, return_last_state=True)
    for t in range(split, length):
        y_t = selective_state_update_ref(state, u[..., t], delta[..., t], A, B[..., t], C[..., t], D,
                                         z[..., t] if z is not None else None, dt_bias, softplus)
        torch.testing.assert_close(y_t, y_ref[..., t], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, last_fast, rtol=1e-5, atol=1e-5)
