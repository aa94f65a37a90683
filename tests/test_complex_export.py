"""Complex arithmetic rewritten into real arithmetic for ONNX export (runtime/complex.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from zoo import tiny_llama4, token_ids

from loraprune.runtime.complex import NoComplexRule, has_complex, realify_complex
from loraprune.runtime.export import export_prefill
from loraprune.runtime.session import make_session


class ComplexOps(nn.Module):
    """Most rules at once: rotary as in Llama 4 (polar, view_as_complex, product, view_as_real), then products with
    real tensors and scalars, sums, a quotient, conjugate, magnitude and phase, and shape ops between them."""

    def forward(self, x: torch.Tensor, angle: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = torch.polar(torch.ones_like(angle), angle) * 0.5  # [s, d/2]
        z = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # [b, s, h, d/2]
        z = z * freqs[None, :, None, :]
        w = (z.transpose(1, 2) * x[..., :1].transpose(1, 2) + 1.0).permute(0, 2, 1, 3)  # real tensor, scalar
        w = torch.cat([w, z.conj()], dim=-1).reshape(x.shape[0], x.shape[1], -1)
        u = torch.cat([z, z * 2], dim=-1).flatten(2)
        q = w / (u + 2.0) - u
        pair = torch.stack([q.abs(), q.angle()], dim=-1).flatten(-2)
        shifted = q * torch.complex(x[:, :, 0, :1], x[:, :1, 1, 1:2])  # torch.complex broadcasts its parts
        return torch.view_as_real(shifted).flatten(-2) + pair, q.real


def test_rewritten_program_computes_the_same_in_real_arithmetic():
    model = ComplexOps().eval()
    x, angle = torch.randn(2, 5, 3, 8), torch.randn(5, 4)
    program = torch.export.export(model, (x, angle), strict=False)
    assert has_complex(program.graph)
    assert realify_complex(program.graph_module.graph)
    program.graph_module.recompile()
    assert not has_complex(program.graph)
    x2, angle2 = torch.randn(2, 5, 3, 8), torch.randn(5, 4)
    torch.testing.assert_close(program.module()(x2, angle2), model(x2, angle2), atol=1e-5, rtol=1e-5)


def test_complex_op_without_a_rule_is_named():
    class Exp(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.view_as_real(torch.exp(torch.view_as_complex(x)))

    program = torch.export.export(Exp(), (torch.randn(3, 2),), strict=False)
    with pytest.raises(NoComplexRule, match=r"aten\.exp.* at node"):
        realify_complex(program.graph_module.graph)


def test_llama4_complex_rotary_exports_with_ort_parity(tmp_path):
    model = tiny_llama4()
    path = export_prefill(model, tmp_path / "model.onnx")
    ids = token_ids(2, 9, seed=1)  # exported at another shape
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits.numpy()
    (got,) = make_session(path, threads=1).run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)
