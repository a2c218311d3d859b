
import pytest
import torch
from synthetic import SyntheticTeacher

from dd2cli.teachers import SamplingSettings
from dd2cli.testing import check_teacher


@pytest.mark.parametrize("steps", [(0, 1, 2), (0, 1, 1, 2, 2, 2)])
def test_synthetic_teacher_passes_contract(steps):
    check_teacher(SyntheticTeacher(steps=steps, vocab_size=3).eval())


def test_exact_joint_is_a_distribution_and_matches_samples():
    t = SyntheticTeacher().eval()
    joint = t.exact_joint(1)
    assert joint.dtype == torch.float64 and abs(float(joint.sum()) - 1.0) < 1e-12
    n = 40000
    tokens = t.sample(torch.full((n,), 1), SamplingSettings(), generator=torch.Generator().manual_seed(0))
    V = t.spec.vocab_size
    idx = (tokens[:, 0] * V + tokens[:, 1]) * V + tokens[:, 2]
    emp = torch.bincount(idx, minlength=V ** 3).double() / n
    tv = 0.5 * (emp - joint.flatten()).abs().sum().item()
    assert tv < 0.03, tv


def test_strong_correlation_present():
    """Most of the mass of position 2 given position 1 sits on one value (the {(0,0),(1,1)} structure)."""
    t = SyntheticTeacher().eval()
    joint = t.exact_joint(0)
    cond = joint.sum(0)  # (x1, x2)
    cond = cond / cond.sum(1, keepdim=True)
    assert (cond.max(1).values > 0.8).all()
    # and the product of marginals is far from the joint (set prediction fails)
    m = [joint.sum(dim=tuple(j for j in range(3) if j != i)) for i in range(3)]
    indep = m[0][:, None, None] * m[1][None, :, None] * m[2][None, None, :]
    assert 0.5 * (indep - joint).abs().sum() > 0.3


def test_contract_suite_catches_a_non_causal_teacher():
    class Leaky(SyntheticTeacher):
        def logits(self, x_BN, labels_B):
            out = super().logits(x_BN, labels_B)
            tokens = self.as_tokens(x_BN)
            return out + tokens[:, -1:, None].float()  # position 0 sees the last token

    with pytest.raises(AssertionError, match="not causal"):
        check_teacher(Leaky().eval())
