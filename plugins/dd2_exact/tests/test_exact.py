"""The exact family: generated teachers pass the contract, their joint is exact, their shapes are what they say."""

import math

import pytest
import torch

from dd2_exact import FAMILY, VARIANTS
from dd2_exact.model import GEOMETRIES, ExactShape, ExactTeacher, make_codebook, shape_family
from dd2cli import check_teacher, plugins
from dd2cli.engine.joint import empirical_joint, noise_floor, set_prediction_tv, tv


@pytest.mark.parametrize("shape", shape_family(6), ids=lambda s: f"{s.tokens_per_step}-V{s.vocab_size}-{s.geometry}")
def test_every_generated_teacher_passes_the_contract_and_its_sampler_draws_its_joint(shape):
    teacher = ExactTeacher(shape).eval()
    check_teacher(teacher)
    m = 20000
    for c in range(shape.num_classes):
        joint = teacher.exact_joint(c)
        assert joint.shape == (shape.vocab_size,) * len(shape.steps)
        assert abs(float(joint.sum()) - 1.0) < 1e-12 and float(joint.min()) >= 0
        ids = teacher.sample(torch.full((m,), c), teacher.spec.target, generator=torch.Generator().manual_seed(c))
        # the teacher's own sampler is at the noise floor of m exact draws (a wrong table would be many times it)
        assert tv(empirical_joint(ids, shape.vocab_size), joint) < 1.3 * noise_floor(joint, m) + 0.005
        # strong correlations: per-position marginals miss most of the joint
        assert set_prediction_tv(joint) > 0.3


def test_the_joint_is_the_product_of_the_tables_by_hand():
    teacher = ExactTeacher(ExactShape((1, 1), vocab_size=3, latent_dim=2, seed=5)).eval()
    joint = teacher.exact_joint(1)
    p0 = teacher.table_0[1, 0].softmax(-1).double()
    for a in range(3):
        p1 = teacher.table_1[1, a].softmax(-1).double()
        for b in range(3):
            assert math.isclose(float(joint[a, b]), float(p0[a] * p1[b]), rel_tol=1e-5)


def test_a_stronger_correlation_puts_the_joint_further_from_its_marginals():
    teacher = ExactTeacher(ExactShape((1, 1), vocab_size=4, strength=0.0, seed=2)).eval()
    # without the copy bonus the tables still depend on the parent at random, but far less than with it
    strong = ExactTeacher(ExactShape((1, 1), vocab_size=4, strength=6.0, seed=2)).eval()
    assert set_prediction_tv(strong.exact_joint(0)) > 2 * set_prediction_tv(teacher.exact_joint(0))


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_codebook_geometries(geometry):
    cb = make_codebook(ExactShape((1,), vocab_size=6, latent_dim=3, geometry=geometry), torch.Generator().manual_seed(0))
    d = torch.cdist(cb, cb) + torch.eye(6) * 9
    if geometry == "clustered":  # codes in close pairs
        assert math.isclose(float(d.min()), 0.15, rel_tol=1e-4) and float(d.min(1).values.max()) < 0.2
    elif geometry == "anisotropic":  # far apart along the first axis only
        assert float(cb[:, 1:].abs().max()) < 0.25 and float(cb[:, 0].abs().max()) > 0.9
    else:
        assert float(d.min()) > 0.9


def test_shapes_that_cannot_be_enumerated_or_make_no_sense_are_refused():
    with pytest.raises(ValueError, match="joint entries"):
        ExactShape((1,) * 8, vocab_size=8).validate()
    with pytest.raises(ValueError, match="geometry"):
        ExactShape(geometry="round").validate()
    with pytest.raises(ValueError, match="positive count"):
        ExactShape(tokens_per_step=(1, 0)).validate()


def test_registered_variants_load_without_weight_files_and_agree_with_their_spec():
    import dd2_exact

    plugins.register_plugin(dd2_exact, name="exact")
    for variant in VARIANTS:
        teacher = plugins.get_variant(variant.name).load()
        assert teacher.spec.image_size == variant.image_size
        assert teacher.identity()["teacher"] == variant.name
        check_teacher(teacher.eval())
    assert {v.name for v in FAMILY.variants} == {"exact-raster", "exact-scales"}
    scales = plugins.get_variant("exact-scales").load()
    assert scales.spec.steps == (0, 0, 1, 1)


def test_the_same_shape_gives_the_same_teacher_and_another_seed_another():
    a, b = ExactTeacher(ExactShape(seed=3)), ExactTeacher(ExactShape(seed=3))
    c = ExactTeacher(ExactShape(seed=4))
    assert torch.equal(a.exact_joint(0), b.exact_joint(0)) and not torch.equal(a.exact_joint(0), c.exact_joint(0))
    assert all(torch.equal(p, q) for p, q in zip(a.new_backbone().parameters(), b.new_backbone().parameters()))
