"""The teacher's flow map (DD1-style coupling) used to initialise the generator."""

import torch
from joint import tv_generator

from dd2cli.flowmap import flow_map_loss, teacher_flow_map


class _FlowMapSampler(torch.nn.Module):
    """`(ε, labels) → codes` through the teacher's flow map, shaped like a generator for `joint.tv_generator`."""

    def __init__(self, teacher, euler_steps):
        super().__init__()
        self.teacher, self.euler_steps = teacher, euler_steps

    def forward(self, eps_BNd, labels_B):
        return teacher_flow_map(self.teacher, eps_BNd, labels_B, self.teacher.spec.target,
                                euler_steps=self.euler_steps)[1]


def test_flow_map_pushes_noise_onto_the_teachers_joint(synthetic_teacher):
    """Gaussian noise through the map hits every token sequence with the teacher's probability (TV near the
    sampling-noise floor of ~0.01 at 20k samples per class), correlations included; a 2-step Euler map is
    visibly off, so the test sees the ODE, not luck."""
    fine = tv_generator(_FlowMapSampler(synthetic_teacher, 20), synthetic_teacher, n=20000)
    coarse = tv_generator(_FlowMapSampler(synthetic_teacher, 2), synthetic_teacher, n=20000)
    assert fine < 0.04, fine
    assert coarse > 2 * fine, (coarse, fine)


def test_flow_map_is_deterministic_and_causal(synthetic_teacher):
    t = synthetic_teacher
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(512, t.spec.num_tokens, t.spec.latent_dim, generator=g)
    labels = torch.randint(0, t.spec.num_classes, (512,), generator=g)
    ids, z = teacher_flow_map(t, eps, labels, t.spec.target)
    again, _ = teacher_flow_map(t, eps.clone(), labels, t.spec.target)
    assert torch.equal(ids, again)
    assert torch.equal(z, t.codebook()[ids])
    assert len(ids.unique()) == t.spec.vocab_size  # noise reaches every code, not one mode
    moved = eps.clone()
    moved[:, -1] = torch.randn(512, t.spec.latent_dim, generator=g)  # only the last AR step's noise
    ids2, _ = teacher_flow_map(t, moved, labels, t.spec.target)
    assert torch.equal(ids2[:, :-1], ids[:, :-1]) and not torch.equal(ids2[:, -1], ids[:, -1])


def test_flow_map_loss_trains_the_generator_towards_the_map(synthetic_teacher):
    from dd2cli.heads import MLPHead
    from dd2cli.networks import ARDiffusion, Generator

    t = synthetic_teacher
    torch.manual_seed(0)
    backbone = t.new_backbone()
    gen = Generator(ARDiffusion(backbone, MLPHead(t.spec.latent_dim, backbone.feature_dim, 64, 2, 2.0)))
    opt = torch.optim.Adam(gen.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    history = []
    for _ in range(150):
        eps = torch.randn(128, t.spec.num_tokens, t.spec.latent_dim, generator=g)
        labels = torch.randint(0, t.spec.num_classes, (128,), generator=g)
        loss, agree = flow_map_loss(gen, t, eps, labels, settings=t.spec.target, euler_steps=10)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append((loss.item(), agree))
    assert history[-1][0] < 0.5 * history[0][0]
    assert sum(a for _, a in history[-10:]) / 10 > 0.8  # most positions already land on the map's token
